//! The one place a DNS resolver is built, and the lookups every check uses.
//!
//! Checks must see what DNS says *now*: the hickory cache is disabled, so a
//! record the tenant just published (or removed) is seen on the next check.
//! A shared semaphore caps the queries in flight, so checking 10,000 domains
//! does not flood the resolver, and a counter tells how many queries were
//! made (the benchmark reports queries per domain).
//!
//! Lookups return [`LookupError`], which keeps the one distinction the checks
//! depend on: an *absent* answer (NXDOMAIN, or a name without records of the
//! type) means a record is missing; anything else (timeout, SERVFAIL,
//! REFUSED, a network error) means we do not know, and must never be taken
//! for "missing".

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use hickory_resolver::TokioResolver;
use hickory_resolver::config::{
    ConnectionConfig, NameServerConfig, ResolveHosts, ResolverConfig, ResolverOpts,
};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::net::{DnsError, NetError, NoRecords};
use hickory_resolver::proto::op::ResponseCode;
use hickory_resolver::proto::rr::{Name, RData, RecordType};
use tokio::sync::Semaphore;

/// How the resolver reaches DNS.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResolverSettings {
    /// Nameservers to ask, each with its port. Empty: the system resolver
    /// (`/etc/resolv.conf`).
    pub servers: Vec<SocketAddr>,
    /// How long to wait for one answer.
    pub timeout: Duration,
    /// How many times a query is sent before giving up.
    pub attempts: usize,
    /// Most queries in flight at once, across every check sharing this
    /// resolver.
    pub max_concurrent_queries: usize,
}

impl Default for ResolverSettings {
    fn default() -> Self {
        Self {
            servers: Vec::new(),
            timeout: Duration::from_secs(2),
            attempts: 2,
            max_concurrent_queries: 64,
        }
    }
}

/// Parses a `--dns-server` value: `IP:PORT`, `[IPv6]:PORT`, or a bare IP
/// (port 53).
pub fn parse_server(text: &str) -> Result<SocketAddr, ResolverError> {
    if let Ok(addr) = text.parse::<SocketAddr>() {
        return Ok(addr);
    }
    text.parse::<IpAddr>()
        .map(|ip| SocketAddr::new(ip, 53))
        .map_err(|_| ResolverError::InvalidServer(text.to_string()))
}

/// Why a resolver could not be built.
#[derive(Debug, thiserror::Error)]
pub enum ResolverError {
    #[error("DNS server `{0}` is not an address: give IP:PORT such as 127.0.0.1:5353 or [::1]:53")]
    InvalidServer(String),
    #[error("reading the system resolver configuration (/etc/resolv.conf): {0}")]
    SystemConfig(NetError),
    #[error("building the DNS resolver: {0}")]
    Build(NetError),
}

/// Why a lookup gave no records.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum LookupError {
    /// The name does not exist at all.
    #[error("{name} does not exist (NXDOMAIN)")]
    NxDomain { name: String },
    /// The name exists but has no records of the type asked for.
    #[error("{name} has no {record_type} record")]
    NoRecords { name: String, record_type: String },
    /// No answer in time.
    #[error("{record_type} lookup of {name} timed out")]
    Timeout { name: String, record_type: String },
    /// The server answered with an error code such as SERVFAIL or REFUSED.
    #[error("{record_type} lookup of {name} failed: the server answered {code}")]
    Server {
        name: String,
        record_type: String,
        code: String,
    },
    /// The name cannot be put in a query.
    #[error("`{name}` is not a valid DNS name")]
    InvalidName { name: String },
    /// Anything else: the network, the resolver.
    #[error("{record_type} lookup of {name} failed: {message}")]
    Other {
        name: String,
        record_type: String,
        message: String,
    },
}

impl LookupError {
    /// True when DNS positively said there is nothing there (NXDOMAIN or an
    /// empty answer): the record is missing. False when we simply do not
    /// know.
    pub fn is_absent(&self) -> bool {
        matches!(self, Self::NxDomain { .. } | Self::NoRecords { .. })
    }
}

/// The lookups the checks need. Implemented by [`DnsResolver`]; unit tests
/// implement it over a map.
pub trait DnsLookup: Sync {
    /// TXT records at `name`, each one's strings joined (RFC 7208 3.3,
    /// RFC 6376 3.6.2.2).
    fn txt(&self, name: &str) -> impl Future<Output = Result<Vec<String>, LookupError>> + Send;
    /// The target of the CNAME at `name`, lowercase, without the trailing
    /// dot.
    fn cname(&self, name: &str) -> impl Future<Output = Result<String, LookupError>> + Send;
    /// MX exchanges of `name`, most preferred first, without trailing dots.
    fn mx(&self, name: &str) -> impl Future<Output = Result<Vec<String>, LookupError>> + Send;
    /// IPv4 (A) or IPv6 (AAAA) addresses of `name`.
    fn addresses(
        &self,
        name: &str,
        family: AddressFamily,
    ) -> impl Future<Output = Result<Vec<IpAddr>, LookupError>> + Send;
}

/// Which address records to ask for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum AddressFamily {
    V4,
    V6,
}

impl AddressFamily {
    pub fn of(ip: &IpAddr) -> Self {
        match ip {
            IpAddr::V4(_) => Self::V4,
            IpAddr::V6(_) => Self::V6,
        }
    }
}

/// A resolver for checks: no cache, a cap on queries in flight, a query
/// counter. Share one (in an `Arc`) for the whole process.
pub struct DnsResolver {
    inner: TokioResolver,
    permits: Arc<Semaphore>,
    queries: AtomicU64,
}

impl DnsResolver {
    pub fn new(settings: &ResolverSettings) -> Result<Self, ResolverError> {
        let (config, mut options) = if settings.servers.is_empty() {
            hickory_resolver::system_conf::read_system_conf()
                .map_err(ResolverError::SystemConfig)?
        } else {
            let servers = settings.servers.iter().map(|addr| {
                // UDP first, TCP when an answer is truncated.
                let mut udp = ConnectionConfig::udp();
                udp.port = addr.port();
                let mut tcp = ConnectionConfig::tcp();
                tcp.port = addr.port();
                NameServerConfig::new(addr.ip(), true, vec![udp, tcp])
            });
            (
                ResolverConfig::from_name_servers(servers.collect()),
                ResolverOpts::default(),
            )
        };
        // No cache: a check must see a record published (or removed) a
        // second ago. A zero-sized cache is not enough: its entries are
        // evicted lazily and can still be served in the meantime, so every
        // answer also expires the moment it arrives.
        options.cache_size = 0;
        options.positive_max_ttl = Some(Duration::ZERO);
        options.negative_max_ttl = Some(Duration::ZERO);
        options.timeout = settings.timeout;
        options.attempts = settings.attempts.max(1);
        options.use_hosts_file = ResolveHosts::Never;
        // Every query is fully qualified; never try search domains.
        options.ndots = 0;
        // hickory refuses requests beyond this per connection ("busy"); our
        // own semaphore is the limit that matters.
        options.max_active_requests = options
            .max_active_requests
            .max(settings.max_concurrent_queries);
        let inner = TokioResolver::builder_with_config(config, TokioRuntimeProvider::default())
            .with_options(options)
            .build()
            .map_err(ResolverError::Build)?;
        Ok(Self {
            inner,
            permits: Arc::new(Semaphore::new(settings.max_concurrent_queries.max(1))),
            queries: AtomicU64::new(0),
        })
    }

    /// How many queries this resolver has sent (each lookup counts once,
    /// whatever the retries underneath).
    pub fn queries_made(&self) -> u64 {
        self.queries.load(Ordering::Relaxed)
    }

    async fn lookup(&self, name: &str, record_type: RecordType) -> Result<Vec<RData>, LookupError> {
        let fqdn = Name::from_ascii(format!("{}.", name.trim_end_matches('.'))).map_err(|_| {
            LookupError::InvalidName {
                name: name.to_string(),
            }
        })?;
        // The semaphore is never closed, so acquiring only fails if it were;
        // treat that as a resolver failure rather than panicking.
        let _permit = self
            .permits
            .acquire()
            .await
            .map_err(|err| LookupError::Other {
                name: name.to_string(),
                record_type: record_type.to_string(),
                message: err.to_string(),
            })?;
        self.queries.fetch_add(1, Ordering::Relaxed);
        match self.inner.lookup(fqdn, record_type).await {
            Ok(lookup) => {
                // A CNAME chain comes back as intermediate records: keep only
                // the type asked for.
                let data: Vec<RData> = lookup
                    .answers()
                    .iter()
                    .filter(|record| record.record_type() == record_type)
                    .map(|record| record.data.clone())
                    .collect();
                if data.is_empty() {
                    Err(LookupError::NoRecords {
                        name: name.to_string(),
                        record_type: record_type.to_string(),
                    })
                } else {
                    Ok(data)
                }
            }
            Err(err) => Err(classify(name, record_type, &err)),
        }
    }
}

/// Sorts a hickory error into absent (NXDOMAIN, no records) or unknown.
fn classify(name: &str, record_type: RecordType, err: &NetError) -> LookupError {
    let name = name.to_string();
    let record_type = record_type.to_string();
    match err {
        NetError::Dns(DnsError::NoRecordsFound(NoRecords { response_code, .. })) => {
            if *response_code == ResponseCode::NXDomain {
                LookupError::NxDomain { name }
            } else {
                LookupError::NoRecords { name, record_type }
            }
        }
        NetError::Dns(DnsError::ResponseCode(code)) => LookupError::Server {
            name,
            record_type,
            code: code.to_string(),
        },
        NetError::Timeout => LookupError::Timeout { name, record_type },
        other => LookupError::Other {
            name,
            record_type,
            message: other.to_string(),
        },
    }
}

impl DnsLookup for DnsResolver {
    async fn txt(&self, name: &str) -> Result<Vec<String>, LookupError> {
        let data = self.lookup(name, RecordType::TXT).await?;
        Ok(data
            .iter()
            .filter_map(|rdata| match rdata {
                RData::TXT(txt) => Some(
                    txt.txt_data
                        .iter()
                        .map(|part| String::from_utf8_lossy(part))
                        .collect::<String>(),
                ),
                _ => None,
            })
            .collect())
    }

    async fn cname(&self, name: &str) -> Result<String, LookupError> {
        let data = self.lookup(name, RecordType::CNAME).await?;
        data.iter()
            .find_map(|rdata| match rdata {
                RData::CNAME(cname) => Some(
                    cname
                        .0
                        .to_ascii()
                        .trim_end_matches('.')
                        .to_ascii_lowercase(),
                ),
                _ => None,
            })
            .ok_or_else(|| LookupError::NoRecords {
                name: name.to_string(),
                record_type: "CNAME".into(),
            })
    }

    async fn mx(&self, name: &str) -> Result<Vec<String>, LookupError> {
        let data = self.lookup(name, RecordType::MX).await?;
        let mut exchanges: Vec<(u16, String)> = data
            .iter()
            .filter_map(|rdata| match rdata {
                RData::MX(mx) => Some((
                    mx.preference,
                    mx.exchange
                        .to_ascii()
                        .trim_end_matches('.')
                        .to_ascii_lowercase(),
                )),
                _ => None,
            })
            .collect();
        exchanges.sort();
        Ok(exchanges.into_iter().map(|(_, host)| host).collect())
    }

    async fn addresses(
        &self,
        name: &str,
        family: AddressFamily,
    ) -> Result<Vec<IpAddr>, LookupError> {
        let record_type = match family {
            AddressFamily::V4 => RecordType::A,
            AddressFamily::V6 => RecordType::AAAA,
        };
        let data = self.lookup(name, record_type).await?;
        Ok(data
            .iter()
            .filter_map(|rdata| match rdata {
                RData::A(a) => Some(IpAddr::V4(a.0)),
                RData::AAAA(aaaa) => Some(IpAddr::V6(aaaa.0)),
                _ => None,
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn servers_parse_with_and_without_port() {
        assert_eq!(
            parse_server("127.0.0.1:5353").unwrap(),
            "127.0.0.1:5353".parse().unwrap()
        );
        assert_eq!(
            parse_server("[::1]:53").unwrap(),
            "[::1]:53".parse().unwrap()
        );
        assert_eq!(
            parse_server("192.0.2.1").unwrap(),
            "192.0.2.1:53".parse().unwrap()
        );
        assert!(matches!(
            parse_server("ns.example:53"),
            Err(ResolverError::InvalidServer(_))
        ));
    }

    #[test]
    fn only_nxdomain_and_empty_answers_are_absent() {
        let absent = [
            LookupError::NxDomain { name: "a".into() },
            LookupError::NoRecords {
                name: "a".into(),
                record_type: "TXT".into(),
            },
        ];
        let unknown = [
            LookupError::Timeout {
                name: "a".into(),
                record_type: "TXT".into(),
            },
            LookupError::Server {
                name: "a".into(),
                record_type: "TXT".into(),
                code: "SERVFAIL".into(),
            },
        ];
        assert!(absent.iter().all(LookupError::is_absent));
        assert!(!unknown.iter().any(LookupError::is_absent));
    }
}
