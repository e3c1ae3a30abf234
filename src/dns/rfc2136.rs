//! RFC 2136 dynamic updates signed with TSIG (RFC 8945), over TCP.
//!
//! Messages, TSIG signing and response verification are hickory-proto's.
//! The exchange itself (a length-prefixed message over one TCP connection)
//! is kept here rather than in hickory-net's client: that client turns an
//! unsigned NOTAUTH answer (the server's reply to an unknown key or a bad
//! MAC) into a bare "tsig validation error", and the tenant must be told
//! which one it is (`BadTSIG` against `ZoneNotServed`).

use std::net::SocketAddr;
use std::time::Duration;

use hickory_proto::op::{Message, MessageType, OpCode, Query, ResponseCode, UpdateMessage};
use hickory_proto::rr::rdata::TXT;
use hickory_proto::rr::rdata::tsig::{TsigAlgorithm as HickoryAlg, TsigError};
use hickory_proto::rr::{DNSClass, Name, RData, Record, RecordType, TSigner};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::api::TsigAlgorithm;

/// How long one exchange with the server may take.
const TIMEOUT: Duration = Duration::from_secs(5);
/// Allowed clock difference with the server (RFC 8945 recommends 300 s).
const FUDGE: u16 = 300;

/// Why an update was not applied. The messages say what to do.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum UpdateError {
    #[error(
        "the server refused the TSIG key {key} ({why}): check the key name, algorithm and secret in the DNSProvider's Secret"
    )]
    BadTsig { key: String, why: String },
    #[error(
        "the server is not authoritative for zone {zone} (NOTAUTH/NOTZONE): check the DNSProvider's zones and the server address"
    )]
    ZoneNotServed { zone: String },
    #[error(
        "the server refused the update to zone {zone} (REFUSED): its ACL must allow updates with this key"
    )]
    Refused { zone: String },
    #[error("a record changed at the server meanwhile ({rcode}); nothing was written")]
    PreconditionFailed { rcode: String },
    #[error("the server at {server} could not be reached: {why}")]
    Unreachable { server: SocketAddr, why: String },
    #[error("the server answered {rcode}")]
    Failed { rcode: String },
    #[error("{0}")]
    Invalid(String),
}

/// A primary server and the TSIG key to sign updates with.
#[derive(Clone)]
pub struct Rfc2136Client {
    server: SocketAddr,
    key_name: String,
    signer: TSigner,
}

/// One change in an update message.
pub enum Change<'a> {
    /// Add a TXT record (its character-strings).
    AddTxt {
        name: &'a str,
        strings: &'a [String],
    },
    /// Delete exactly this TXT record (RFC 2136 2.5.4).
    DeleteTxt {
        name: &'a str,
        strings: &'a [String],
    },
}

/// A prerequisite of an update message.
pub enum Prerequisite<'a> {
    /// No TXT RRset at the name (2.4.3).
    NoTxt { name: &'a str },
    /// The TXT RRset at the name is exactly these records (2.4.2).
    TxtIs {
        name: &'a str,
        records: &'a [Vec<String>],
    },
}

impl Rfc2136Client {
    /// `secret` is the key's raw bytes (decoded from base64).
    pub fn new(
        server: SocketAddr,
        key_name: &str,
        algorithm: TsigAlgorithm,
        secret: Vec<u8>,
    ) -> Result<Self, UpdateError> {
        let algorithm = match algorithm {
            TsigAlgorithm::HmacSha256 => HickoryAlg::HmacSha256,
            TsigAlgorithm::HmacSha384 => HickoryAlg::HmacSha384,
            TsigAlgorithm::HmacSha512 => HickoryAlg::HmacSha512,
        };
        let name = fqdn(key_name)?;
        let signer = TSigner::new(secret, algorithm, name, FUDGE)
            .map_err(|e| UpdateError::Invalid(format!("TSIG key {key_name}: {e}")))?;
        Ok(Self {
            server,
            key_name: key_name.to_string(),
            signer,
        })
    }

    /// Applies `changes` to `zone` if every prerequisite holds, as one
    /// atomic update.
    pub async fn update(
        &self,
        zone: &str,
        prerequisites: &[Prerequisite<'_>],
        changes: &[Change<'_>],
        ttl: u32,
    ) -> Result<(), UpdateError> {
        let zone_name = fqdn(zone)?;
        let mut message = Message::new(fastrand::u16(..), MessageType::Query, OpCode::Update);
        message.metadata.recursion_desired = false;
        let mut zone_query = Query::new();
        zone_query
            .set_name(zone_name)
            .set_query_class(DNSClass::IN)
            .set_query_type(RecordType::SOA);
        message.add_zone(zone_query);
        for prerequisite in prerequisites {
            match prerequisite {
                Prerequisite::NoTxt { name } => {
                    let mut record = Record::update0(fqdn(name)?, 0, RecordType::TXT);
                    record.dns_class = DNSClass::NONE;
                    message.add_pre_requisite(record.into_record_of_rdata());
                }
                Prerequisite::TxtIs { name, records } => {
                    for strings in records.iter() {
                        message.add_pre_requisite(txt_record(name, strings, 0)?);
                    }
                }
            }
        }
        for change in changes {
            match change {
                Change::AddTxt { name, strings } => {
                    message.add_update(txt_record(name, strings, ttl)?);
                }
                Change::DeleteTxt { name, strings } => {
                    let mut record = txt_record(name, strings, 0)?;
                    record.dns_class = DNSClass::NONE;
                    message.add_update(record);
                }
            }
        }
        let response = self.exchange(message, true).await?;
        match response.metadata.response_code {
            ResponseCode::NoError => Ok(()),
            ResponseCode::NotAuth | ResponseCode::NotZone => Err(UpdateError::ZoneNotServed {
                zone: zone.to_string(),
            }),
            ResponseCode::Refused => Err(UpdateError::Refused {
                zone: zone.to_string(),
            }),
            code @ (ResponseCode::YXRRSet
            | ResponseCode::NXRRSet
            | ResponseCode::YXDomain
            | ResponseCode::NXDomain) => Err(UpdateError::PreconditionFailed {
                rcode: code.to_string(),
            }),
            code => Err(UpdateError::Failed {
                rcode: code.to_string(),
            }),
        }
    }

    /// The TXT records at `name`, asked of the primary itself (a
    /// resolver's cache may lag behind it), each as its character-strings.
    pub async fn txt(&self, zone: &str, name: &str) -> Result<Vec<Vec<String>>, UpdateError> {
        let mut message = Message::query();
        message.metadata.recursion_desired = false;
        message.add_query(Query::query(fqdn(name)?, RecordType::TXT));
        let response = self.exchange(message, false).await?;
        match response.metadata.response_code {
            ResponseCode::NoError | ResponseCode::NXDomain => Ok(response
                .answers
                .iter()
                .filter_map(|record| match &record.data {
                    RData::TXT(txt) => Some(
                        txt.txt_data
                            .iter()
                            .map(|s| String::from_utf8_lossy(s).into_owned())
                            .collect(),
                    ),
                    _ => None,
                })
                .collect()),
            ResponseCode::Refused | ResponseCode::NotAuth => Err(UpdateError::ZoneNotServed {
                zone: zone.to_string(),
            }),
            code => Err(UpdateError::Failed {
                rcode: code.to_string(),
            }),
        }
    }

    /// One request and its answer over a fresh TCP connection; updates are
    /// signed and their answers verified.
    async fn exchange(&self, mut message: Message, sign: bool) -> Result<Message, UpdateError> {
        let unreachable = |why: String| UpdateError::Unreachable {
            server: self.server,
            why,
        };
        let mut verifier = None;
        if sign {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or_default();
            verifier = message
                .finalize(&self.signer, now)
                .map_err(|e| UpdateError::Invalid(e.to_string()))?;
        }
        let bytes = message
            .to_vec()
            .map_err(|e| UpdateError::Invalid(e.to_string()))?;
        let length = u16::try_from(bytes.len())
            .map_err(|_| UpdateError::Invalid("the update is larger than 64 KiB".into()))?;
        let answer = tokio::time::timeout(TIMEOUT, async {
            let mut stream = TcpStream::connect(self.server).await?;
            stream.write_all(&length.to_be_bytes()).await?;
            stream.write_all(&bytes).await?;
            let mut length = [0u8; 2];
            stream.read_exact(&mut length).await?;
            let mut answer = vec![0u8; usize::from(u16::from_be_bytes(length))];
            stream.read_exact(&mut answer).await?;
            Ok::<_, std::io::Error>(answer)
        })
        .await
        .map_err(|_| unreachable(format!("no answer within {} s", TIMEOUT.as_secs())))?
        .map_err(|e| unreachable(e.to_string()))?;
        let response =
            Message::from_vec(&answer).map_err(|e| UpdateError::Invalid(e.to_string()))?;
        if response.metadata.id != message.metadata.id {
            return Err(UpdateError::Invalid(
                "the answer is for another request".into(),
            ));
        }
        let Some(mut verifier) = verifier else {
            return Ok(response);
        };
        // A server that does not know the key, or found the MAC wrong,
        // answers NOTAUTH with a TSIG error and no MAC of its own.
        let tsig_error = response.signature.as_ref().and_then(|sig| sig.data.error);
        if let Some(error) = tsig_error {
            return Err(self.bad_tsig(match error {
                TsigError::BadKey => "unknown key".into(),
                TsigError::BadSig => "bad signature: wrong secret or algorithm".into(),
                TsigError::BadTime => "clock difference with the server too large".into(),
                other => format!("{other:?}"),
            }));
        }
        if response.signature.is_none() {
            return Err(self.bad_tsig(format!(
                "unsigned answer {}",
                response.metadata.response_code
            )));
        }
        verifier
            .verify(&answer)
            .map_err(|e| self.bad_tsig(format!("the answer's MAC does not verify: {e}")))?;
        Ok(response)
    }

    fn bad_tsig(&self, why: String) -> UpdateError {
        UpdateError::BadTsig {
            key: self.key_name.clone(),
            why,
        }
    }
}

fn fqdn(name: &str) -> Result<Name, UpdateError> {
    let mut name = Name::from_ascii(name)
        .map_err(|e| UpdateError::Invalid(format!("`{name}` is not a domain name: {e}")))?;
    name.set_fqdn(true);
    Ok(name)
}

fn txt_record(name: &str, strings: &[String], ttl: u32) -> Result<Record, UpdateError> {
    Ok(Record::from_rdata(
        fqdn(name)?,
        ttl,
        RData::TXT(TXT::new(strings.to_vec())),
    ))
}
