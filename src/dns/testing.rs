//! An in-memory DNS for unit tests of the checks.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;

use super::resolver::{AddressFamily, DnsLookup, LookupError};

/// Names map to records; a name with no records at all is NXDOMAIN, a name
/// with records of other types answers empty, and `failing` names time out.
#[derive(Default)]
pub struct FakeDns {
    txt: HashMap<String, Vec<String>>,
    mx: HashMap<String, Vec<String>>,
    addresses: HashMap<String, Vec<IpAddr>>,
    cname: HashMap<String, Vec<String>>,
    failing: HashSet<String>,
}

impl FakeDns {
    pub fn txt(mut self, name: &str, value: &str) -> Self {
        self.txt.entry(name.into()).or_default().push(value.into());
        self
    }

    pub fn mx(mut self, name: &str, exchange: &str) -> Self {
        self.mx
            .entry(name.into())
            .or_default()
            .push(exchange.into());
        self
    }

    /// A CNAME at `name`; a TXT lookup of `name` follows it, as a
    /// resolver does.
    pub fn cname(mut self, name: &str, target: &str) -> Self {
        self.cname.insert(name.into(), vec![target.into()]);
        self
    }

    pub fn a(mut self, name: &str, ip: &str) -> Self {
        let ip = ip.parse().expect("test IP");
        self.addresses.entry(name.into()).or_default().push(ip);
        self
    }

    pub fn failing(mut self, name: &str) -> Self {
        self.failing.insert(name.into());
        self
    }

    fn answer<T: Clone>(
        &self,
        name: &str,
        record_type: &str,
        records: Option<&Vec<T>>,
    ) -> Result<Vec<T>, LookupError> {
        if self.failing.contains(name) {
            return Err(LookupError::Timeout {
                name: name.into(),
                record_type: record_type.into(),
            });
        }
        match records {
            Some(records) if !records.is_empty() => Ok(records.clone()),
            _ if self.exists(name) => Err(LookupError::NoRecords {
                name: name.into(),
                record_type: record_type.into(),
            }),
            _ => Err(LookupError::NxDomain { name: name.into() }),
        }
    }

    fn exists(&self, name: &str) -> bool {
        self.txt.contains_key(name)
            || self.mx.contains_key(name)
            || self.addresses.contains_key(name)
            || self.cname.contains_key(name)
    }
}

impl DnsLookup for FakeDns {
    async fn txt(&self, name: &str) -> Result<Vec<String>, LookupError> {
        match self.cname.get(name).and_then(|targets| targets.first()) {
            Some(target) => self.answer(target, "TXT", self.txt.get(target)),
            None => self.answer(name, "TXT", self.txt.get(name)),
        }
    }

    async fn cname(&self, name: &str) -> Result<String, LookupError> {
        self.answer(name, "CNAME", self.cname.get(name))
            .map(|targets| targets[0].clone())
    }

    async fn mx(&self, name: &str) -> Result<Vec<String>, LookupError> {
        self.answer(name, "MX", self.mx.get(name))
    }

    async fn addresses(
        &self,
        name: &str,
        family: AddressFamily,
    ) -> Result<Vec<IpAddr>, LookupError> {
        let of_family: Option<Vec<IpAddr>> = self.addresses.get(name).map(|all| {
            all.iter()
                .filter(|ip| AddressFamily::of(ip) == family)
                .copied()
                .collect()
        });
        let record_type = match family {
            AddressFamily::V4 => "A",
            AddressFamily::V6 => "AAAA",
        };
        self.answer(name, record_type, of_family.as_ref())
    }
}
