//! The one place that builds the Secret holding a MailDomain's private keys:
//! one PKCS#8 PEM entry per selector, `<selector>.pem`, owned by the
//! MailDomain and labelled so the controller watches only its own Secrets.
//!
//! The Secret also carries the keys' ledger (annotation
//! [`KEY_LEDGER_ANNOTATION`]): each stored key's selector, state,
//! generation and timestamps, written in the same request as the keys. The
//! status is the operator's record; the ledger travels with the keys, so a
//! MailDomain whose status is gone (re-created over a retained Secret, or
//! restored from a backup without status) adopts the keys it finds instead
//! of starting over, and a key stored just before a crash is never an
//! orphan.

use std::collections::{BTreeMap, HashSet};

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::Resource;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use serde::{Deserialize, Serialize};

use crate::api::{DkimKeyStatus, KeyAlgorithm, KeyState, MailDomain};
use crate::dkim::{PrivateKeyPem, public_key_from_pem};

/// Label on every key Secret: the name of the MailDomain it belongs to.
pub const MAILDOMAIN_LABEL: &str = "mailauth.dev/maildomain";
/// Label selecting all Secrets this operator manages.
pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";
pub const MANAGED_BY: &str = "mailauth-operator";

const PEM_SUFFIX: &str = ".pem";

/// Annotation on the key Secret: the ledger of the keys stored in it.
pub const KEY_LEDGER_ANNOTATION: &str = "mailauth.dev/keys";

/// One stored key as the ledger records it: what the status says of it,
/// except the public key, which is always derived from the stored private
/// key (the Secret is in the tenant's namespace; nothing in it is taken on
/// trust that can be checked instead).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct LedgerEntry {
    pub selector: String,
    pub algorithm: KeyAlgorithm,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<u32>,
    pub state: KeyState,
    pub generation: u32,
    pub created_at: Time,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub activated_at: Option<Time>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retiring_at: Option<Time>,
}

/// The ledger for `keys` (as the status will have them), limited to those
/// whose private key is among `entries`.
pub fn ledger(
    keys: &[DkimKeyStatus],
    entries: &BTreeMap<String, PrivateKeyPem>,
) -> Vec<LedgerEntry> {
    keys.iter()
        .filter(|key| key.state != KeyState::Retired && entries.contains_key(&key.selector))
        .map(|key| LedgerEntry {
            selector: key.selector.clone(),
            algorithm: key.algorithm,
            size: key.size,
            state: key.state,
            generation: key.generation,
            created_at: key.created_at.clone(),
            activated_at: key.activated_at.clone(),
            retiring_at: key.retiring_at.clone(),
        })
        .collect()
}

/// The ledger the Secret carries; empty when it has none or it does not
/// parse (then nothing is adopted from it).
pub fn ledger_of(secret: &Secret) -> Vec<LedgerEntry> {
    secret
        .metadata
        .annotations
        .as_ref()
        .and_then(|annotations| annotations.get(KEY_LEDGER_ANNOTATION))
        .and_then(|text| serde_json::from_str(text).ok())
        .unwrap_or_default()
}

/// The key a ledger entry names, if its private key is stored and is a key
/// of the recorded algorithm: the status entry, with the public key derived
/// from the private key.
pub fn adopt(secret: &Secret, entry: &LedgerEntry) -> Option<DkimKeyStatus> {
    let pem = stored_key(secret, &entry.selector)?;
    let public_key = public_key_from_pem(entry.algorithm, &pem).ok()?;
    Some(DkimKeyStatus {
        selector: entry.selector.clone(),
        algorithm: entry.algorithm,
        size: entry.size,
        state: entry.state,
        generation: entry.generation,
        public_key,
        created_at: entry.created_at.clone(),
        verified_at: None,
        activated_at: entry.activated_at.clone(),
        retiring_at: entry.retiring_at.clone(),
        retired_at: None,
    })
}

/// The key Secret's name for a MailDomain.
pub fn keys_secret_name(domain: &MailDomain) -> String {
    format!("{}-dkim", domain.meta().name.as_deref().unwrap_or_default())
}

/// The Secret data key for a selector.
pub fn entry_name(selector: &str) -> String {
    format!("{selector}{PEM_SUFFIX}")
}

/// Selectors whose private key is stored in the Secret.
pub fn stored_selectors(secret: &Secret) -> HashSet<String> {
    secret
        .data
        .iter()
        .flat_map(|data| data.keys())
        .filter_map(|key| key.strip_suffix(PEM_SUFFIX))
        .map(str::to_string)
        .collect()
}

/// Every stored private key, by selector.
pub fn stored_entries(secret: &Secret) -> BTreeMap<String, PrivateKeyPem> {
    stored_selectors(secret)
        .into_iter()
        .filter_map(|selector| stored_key(secret, &selector).map(|pem| (selector, pem)))
        .collect()
}

/// The stored private key of a selector, if present.
pub fn stored_key(secret: &Secret, selector: &str) -> Option<PrivateKeyPem> {
    let bytes = secret.data.as_ref()?.get(&entry_name(selector))?;
    PrivateKeyPem::from_secret_bytes(bytes.0.clone()).ok()
}

/// What the key Secret holds for one key the status lists.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StoredKey {
    /// A private key whose public half is the one in status (the one DNS
    /// verification saw).
    Matches,
    /// No entry for the selector.
    Missing,
    /// An entry that is not that key: edited, replaced, or not a key at all.
    Mismatch,
}

/// Checks the Secret's entry for `key` against the public key recorded in
/// status. The status is the operator's own record; the Secret is in the
/// tenant's namespace and may have been edited.
pub fn check_stored_key(secret: &Secret, key: &DkimKeyStatus) -> StoredKey {
    match secret
        .data
        .as_ref()
        .and_then(|data| data.get(&entry_name(&key.selector)))
    {
        None => StoredKey::Missing,
        Some(bytes) => match PrivateKeyPem::from_secret_bytes(bytes.0.clone())
            .and_then(|pem| public_key_from_pem(key.algorithm, &pem))
        {
            Ok(public_key) if public_key == key.public_key => StoredKey::Matches,
            _ => StoredKey::Mismatch,
        },
    }
}

/// Whether the Secret's owner is this MailDomain (not an earlier one of the
/// same name).
pub fn is_owned_by(secret: &Secret, domain: &MailDomain) -> bool {
    secret
        .metadata
        .owner_references
        .iter()
        .flatten()
        .any(|owner| Some(&owner.uid) == domain.meta().uid.as_ref())
}

/// Whether a Secret of our name may be written by us: it carries our label
/// (we created it, possibly for an earlier MailDomain of the same name that
/// retained it) or is owned by this MailDomain.
pub fn is_ours(secret: &Secret, domain: &MailDomain) -> bool {
    let meta = &secret.metadata;
    let owned = meta
        .owner_references
        .iter()
        .flatten()
        .any(|owner| Some(&owner.uid) == domain.meta().uid.as_ref());
    let labelled = meta
        .labels
        .as_ref()
        .and_then(|labels| labels.get(MAILDOMAIN_LABEL))
        .is_some_and(|name| Some(name) == domain.meta().name.as_ref())
        && meta
            .labels
            .as_ref()
            .and_then(|labels| labels.get(MANAGED_BY_LABEL))
            .is_some_and(|by| by == MANAGED_BY);
    owned || labelled
}

/// The key Secret holding exactly `entries` (selector → PEM) and their
/// `ledger`. It is owned by the MailDomain; the `Retain` policy drops the
/// owner on deletion.
pub fn keys_secret(
    domain: &MailDomain,
    entries: &BTreeMap<String, PrivateKeyPem>,
    ledger: &[LedgerEntry],
) -> Secret {
    let data = entries
        .iter()
        .map(|(selector, pem)| {
            (
                entry_name(selector),
                ByteString(pem.expose_secret().as_bytes().to_vec()),
            )
        })
        .collect();
    let mut secret = domain_secret(domain, keys_secret_name(domain), data);
    secret.metadata.annotations = Some(BTreeMap::from([(
        KEY_LEDGER_ANNOTATION.to_string(),
        serde_json::to_string(ledger).expect("a ledger serialises"),
    )]));
    secret
}

/// A JSON merge patch that makes the Secret read at `read` exactly
/// `desired`: its data, labels, ledger and owner (the owner list replaced
/// whole), and every data entry `read` has that `desired` lacks set to null.
pub fn exact_patch(desired: &Secret, read: Option<&Secret>) -> serde_json::Value {
    let mut data = serde_json::Map::new();
    for key in read
        .and_then(|r| r.data.as_ref())
        .into_iter()
        .flat_map(|d| d.keys())
    {
        data.insert(key.clone(), serde_json::Value::Null);
    }
    for (key, value) in desired.data.iter().flatten() {
        data.insert(
            key.clone(),
            serde_json::to_value(value).expect("bytes serialise"),
        );
    }
    serde_json::json!({
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {
            "name": desired.metadata.name,
            "labels": desired.metadata.labels,
            "annotations": desired.metadata.annotations,
            "ownerReferences": desired.metadata.owner_references,
        },
        "data": data,
    })
}

/// A Secret belonging to a MailDomain: in its namespace, labelled so the
/// controller watches it, owned by it.
fn domain_secret(domain: &MailDomain, name: String, data: BTreeMap<String, ByteString>) -> Secret {
    let owner: Option<OwnerReference> = domain.controller_owner_ref(&());
    Secret {
        metadata: ObjectMeta {
            name: Some(name),
            namespace: domain.meta().namespace.clone(),
            labels: Some(BTreeMap::from([
                (
                    MAILDOMAIN_LABEL.to_string(),
                    domain.meta().name.clone().unwrap_or_default(),
                ),
                (MANAGED_BY_LABEL.to_string(), MANAGED_BY.to_string()),
            ])),
            owner_references: owner.map(|o| vec![o]),
            ..ObjectMeta::default()
        },
        type_: Some("Opaque".into()),
        data: Some(data),
        ..Secret::default()
    }
}

/// The Secret, in the tenant's namespace, with the SMTP credentials of a
/// MailDomain.
pub fn credentials_secret_name(domain: &MailDomain) -> String {
    format!("{}-smtp", domain.meta().name.as_deref().unwrap_or_default())
}

/// The SMTP username of a MailDomain: unique across namespaces.
pub fn smtp_username(domain: &MailDomain) -> String {
    format!(
        "{}.{}",
        domain.meta().name.as_deref().unwrap_or_default(),
        domain.meta().namespace.as_deref().unwrap_or_default()
    )
}

/// A new random password: 32 bytes from the system's CSPRNG, as 64 hex
/// digits. Hex, because a password that starts with `-` or holds `+`, `/`
/// or `=` breaks command lines, URLs and config files it is pasted into.
pub fn new_password() -> Result<String, aws_lc_rs::error::Unspecified> {
    use aws_lc_rs::rand::SecureRandom;
    use std::fmt::Write as _;
    let mut bytes = [0u8; 32];
    aws_lc_rs::rand::SystemRandom::new().fill(&mut bytes)?;
    Ok(bytes
        .iter()
        .fold(String::with_capacity(64), |mut hex, byte| {
            let _ = write!(hex, "{byte:02x}");
            hex
        }))
}

/// The salt of a credential's hash, derived from the username so that the
/// same credential always renders the same relay config (no churn). The
/// password is 256 random bits, so a per-user salt is all a salt must do.
pub fn credential_salt(username: &str) -> Vec<u8> {
    aws_lc_rs::digest::digest(
        &aws_lc_rs::digest::SHA256,
        format!("mailauth-operator/{username}").as_bytes(),
    )
    .as_ref()[..16]
        .to_vec()
}

/// The credentials Secret the tenant's application reads: where to submit
/// and how to authenticate. Owned by the MailDomain.
pub fn credentials_secret(
    domain: &MailDomain,
    host: &str,
    port: u16,
    username: &str,
    password: &str,
) -> Secret {
    let text = |v: &str| ByteString(v.as_bytes().to_vec());
    let data = BTreeMap::from([
        ("host".to_string(), text(host)),
        ("port".to_string(), text(&port.to_string())),
        ("username".to_string(), text(username)),
        ("password".to_string(), text(password)),
    ]);
    domain_secret(domain, credentials_secret_name(domain), data)
}

/// The hash the relay checks a tenant's password against (and the status
/// records): salted SHA-256, see [`credential_salt`].
pub fn credentials_hash(username: &str, password: &str) -> String {
    crate::relay::auth::hash_password(password, &credential_salt(username))
}

/// What the credentials Secret says, against the operator's record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CredentialsCheck {
    /// Ours, with the username we derive and the password we recorded.
    Matches,
    /// No Secret.
    Missing,
    /// A Secret of our name that we did not make.
    NotOwned,
    /// Ours, but no password is recorded in status (never generated, or a
    /// status lost): only the operator's own new password may be used.
    NotRecorded,
    /// Ours, but its username or password is not what we wrote.
    Tampered,
}

/// Checks the credentials Secret of `domain` against `recorded_hash`
/// (`status.credentialsHash`).
pub fn check_credentials(
    secret: Option<&Secret>,
    domain: &MailDomain,
    recorded_hash: Option<&str>,
) -> CredentialsCheck {
    let Some(secret) = secret else {
        return CredentialsCheck::Missing;
    };
    if !is_ours(secret, domain) {
        return CredentialsCheck::NotOwned;
    }
    let Some(recorded) = recorded_hash else {
        return CredentialsCheck::NotRecorded;
    };
    match credentials_of(secret) {
        Some((username, password))
            if username == smtp_username(domain)
                && credentials_hash(&username, &password) == recorded =>
        {
            CredentialsCheck::Matches
        }
        _ => CredentialsCheck::Tampered,
    }
}

/// (username, password) from a credentials Secret.
pub fn credentials_of(secret: &Secret) -> Option<(String, String)> {
    let field = |key: &str| {
        secret
            .data
            .as_ref()?
            .get(key)
            .and_then(|v| String::from_utf8(v.0.clone()).ok())
    };
    Some((field("username")?, field("password")?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::MailDomainSpec;

    fn domain() -> MailDomain {
        let mut md = MailDomain::new(
            "acme",
            serde_json::from_value::<MailDomainSpec>(serde_json::json!({"domain": "acme.example"}))
                .unwrap(),
        );
        md.metadata.namespace = Some("tenant".into());
        md.metadata.uid = Some("uid-1".into());
        md
    }

    #[test]
    fn secret_round_trips_entries_and_is_recognised_as_ours() {
        let md = domain();
        let entries =
            BTreeMap::from([("ma20261126a".to_string(), PrivateKeyPem::new("PEM".into()))]);
        let secret = keys_secret(&md, &entries, &[]);
        assert_eq!(secret.metadata.name.as_deref(), Some("acme-dkim"));
        assert_eq!(
            stored_selectors(&secret),
            HashSet::from(["ma20261126a".to_string()])
        );
        assert_eq!(
            stored_key(&secret, "ma20261126a").unwrap().expose_secret(),
            "PEM"
        );
        assert!(is_ours(&secret, &md));
        assert_eq!(secret.metadata.owner_references.unwrap()[0].uid, "uid-1");
    }

    #[test]
    fn an_exact_patch_names_what_goes_and_replaces_the_owner() {
        let before = domain();
        let mut after = domain();
        after.metadata.uid = Some("uid-2".into());
        let pem = |text: &str| PrivateKeyPem::new(text.into());
        let read = keys_secret(
            &before,
            &BTreeMap::from([("a".to_string(), pem("A")), ("b".to_string(), pem("B"))]),
            &[],
        );
        let desired = keys_secret(&after, &BTreeMap::from([("a".to_string(), pem("A"))]), &[]);
        let patch = exact_patch(&desired, Some(&read));
        assert_eq!(patch["data"]["b.pem"], serde_json::Value::Null);
        assert!(patch["data"]["a.pem"].is_string());
        let owners = patch["metadata"]["ownerReferences"].as_array().unwrap();
        assert_eq!(owners.len(), 1);
        assert_eq!(owners[0]["uid"], "uid-2");
        assert!(patch["metadata"]["annotations"][KEY_LEDGER_ANNOTATION].is_string());
    }

    #[test]
    fn a_foreign_secret_of_the_same_name_is_not_ours() {
        let md = domain();
        let foreign = Secret {
            metadata: ObjectMeta {
                name: Some("acme-dkim".into()),
                ..ObjectMeta::default()
            },
            ..Secret::default()
        };
        assert!(!is_ours(&foreign, &md));
    }

    #[test]
    fn credentials_round_trip_and_salts_are_stable() {
        let md = domain();
        let password = new_password().unwrap();
        assert_eq!(password.len(), 64);
        assert!(password.bytes().all(|b| b.is_ascii_hexdigit()));
        assert_ne!(password, new_password().unwrap());
        let secret = credentials_secret(
            &md,
            "shared-relay.mail.svc",
            587,
            &smtp_username(&md),
            &password,
        );
        assert_eq!(
            credentials_of(&secret),
            Some(("acme.tenant".to_string(), password))
        );
        assert_eq!(
            credential_salt("acme.tenant"),
            credential_salt("acme.tenant")
        );
        assert_ne!(
            credential_salt("acme.tenant"),
            credential_salt("other.tenant")
        );
    }
}
