//! TLS for the admin endpoint: the server certificate and key from PEM
//! files, optional client-certificate verification against a CA, and
//! reloading when the files change.
//!
//! The files are checked (one `stat` each) whenever a connection arrives;
//! when any changed, they are read again. A new set that does not load
//! (a half-written file, a key that does not match its certificate) keeps
//! the previous certificate serving and is logged once, with why.

use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use rustls::ServerConfig;

use crate::config::pem::{load, TlsError};
use crate::config::AdminTls;

/// What the files looked like when last read: modification time and size
/// of each, `None` where the file could not be examined.
type Stamp = Vec<Option<(SystemTime, u64)>>;

fn stamp(files: &AdminTls) -> Stamp {
    std::iter::once(&files.cert)
        .chain([&files.key])
        .chain(files.client_ca.as_ref())
        .map(|p| {
            // `metadata` follows symlinks, so a Kubernetes secret volume's
            // swapped `..data` link counts as a change.
            let m = std::fs::metadata(p).ok()?;
            Some((m.modified().ok()?, m.len()))
        })
        .collect()
}

/// The current TLS config, reread when its files change.
#[derive(Debug)]
pub struct Reloading {
    files: AdminTls,
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    /// The files as they were when `config` was built.
    loaded: Stamp,
    config: Arc<ServerConfig>,
    /// The files as they were when they last failed to load, so a bad set
    /// is logged once rather than on every connection.
    failed: Option<Stamp>,
}

impl Reloading {
    /// Loads the files once; fails if they are unusable now.
    pub fn new(files: AdminTls) -> Result<Self, TlsError> {
        let loaded = stamp(&files);
        let config = load(&files)?;
        Ok(Self {
            files,
            state: Mutex::new(State {
                loaded,
                config,
                failed: None,
            }),
        })
    }

    /// The config to use for a new connection.
    pub fn current(&self) -> Arc<ServerConfig> {
        let now = stamp(&self.files);
        let mut state = self.state.lock().expect("the tls state lock is never poisoned");
        if now == state.loaded || state.failed.as_ref() == Some(&now) {
            return state.config.clone();
        }
        match load(&self.files) {
            Ok(config) => {
                tracing::info!(cert = %self.files.cert.display(), "admin tls certificate reloaded");
                state.config = config;
                state.loaded = now;
                state.failed = None;
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot reload the admin tls files; the previous certificate stays in use");
                state.failed = Some(now);
            }
        }
        state.config.clone()
    }
}

/// Who a verified client certificate names, for audit lines:
/// `client-cert CN=...` (its subject's common name), or its SHA-256
/// fingerprint's first 16 hex digits when it has none.
pub(super) fn client_identity(der: &[u8]) -> String {
    match subject_common_name(der) {
        Some(cn) => format!("client-cert CN={cn}"),
        None => {
            use sha2::{Digest as _, Sha256};
            let digest = Sha256::digest(der);
            let hex: String = digest.iter().take(8).map(|b| format!("{b:02x}")).collect();
            format!("client-cert sha256:{hex}")
        }
    }
}

/// Longest common name kept for an audit line.
const MAX_CN: usize = 64;

/// The last common name (OID 2.5.4.3) of a DER certificate's subject,
/// printable ASCII only; `None` when the certificate does not parse that
/// far or has none. Pure, and never panics on any input.
fn subject_common_name(der: &[u8]) -> Option<String> {
    const CN: &[u8] = &[0x55, 0x04, 0x03];
    let (_, cert, _) = tlv(der)?;
    let (_, tbs, _) = tlv(cert)?;
    let mut rest = tbs;
    // [0] version (optional), serial, signature, issuer, validity, subject.
    let (tag, _, after) = tlv(rest)?;
    if tag == 0xa0 {
        rest = after;
    }
    for _ in 0..4 {
        rest = tlv(rest)?.2;
    }
    let (tag, mut rdns, _) = tlv(rest)?;
    if tag != 0x30 {
        return None;
    }
    let mut found = None;
    while !rdns.is_empty() {
        let (_, mut set, next) = tlv(rdns)?;
        rdns = next;
        while !set.is_empty() {
            let (_, attr, next) = tlv(set)?;
            set = next;
            let (oid_tag, oid, value) = tlv(attr)?;
            if oid_tag == 0x06 && oid == CN {
                let (_, text, _) = tlv(value)?;
                let text: String = text
                    .iter()
                    .take(MAX_CN)
                    .map(|&b| {
                        if b.is_ascii_graphic() || b == b' ' {
                            char::from(b)
                        } else {
                            '?'
                        }
                    })
                    .collect();
                found = Some(text);
            }
        }
    }
    found
}

/// One DER TLV at the start of `input`: its tag, its contents and what
/// follows it. Single-byte tags and definite lengths of up to 4 bytes.
fn tlv(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, mut rest) = rest.split_first()?;
    let len = if first < 0x80 {
        usize::from(first)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 {
            return None;
        }
        let (bytes, after) = rest.split_at_checked(n)?;
        rest = after;
        bytes.iter().fold(0usize, |acc, &b| (acc << 8) | usize::from(b))
    };
    let (contents, after) = rest.split_at_checked(len)?;
    Some((tag, contents, after))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `openssl req -x509 -subj "/O=Acme/CN=ops-alice"`, DER.
    const CERT: &str = "3082019c30820141a00302010202144c1bd26dd5466a07414fa58e3d857cb5afc62af0300a06082a8648ce3d0403023023310d300b060355040a0c0441636d653112301006035504030c096f70732d616c696365301e170d3236313230313131303833365a170d3336313132383131303833365a3023310d300b060355040a0c0441636d653112301006035504030c096f70732d616c6963653059301306072a8648ce3d020106082a8648ce3d0301070342000452b1d55dfb9369edb38164876638a92302c9ffe04966ec55ac84ff0f01a294884dc66256a66d4f8a34128e047b0af6b898388289967cde15b28ffe55be1c9051a3533051301d0603551d0e04160414699f78dd71c11cdb52bc048566f3f72b1f33c992301f0603551d23041830168014699f78dd71c11cdb52bc048566f3f72b1f33c992300f0603551d130101ff040530030101ff300a06082a8648ce3d0403020349003046022100a274f4f533b845da1bfaa4a475dbcdc419fed5154a3257f5ce89a0b3214438ec0221008dafbfc2e904cc0a5d9f187b8dc57b76e37a65821b1b6c28b3e364ef37583d95";

    fn cert() -> Vec<u8> {
        (0..CERT.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&CERT[i..i + 2], 16).unwrap())
            .collect()
    }

    #[test]
    fn a_client_certificate_is_named_by_its_common_name() {
        assert_eq!(subject_common_name(&cert()).as_deref(), Some("ops-alice"));
        assert_eq!(client_identity(&cert()), "client-cert CN=ops-alice");
    }

    #[test]
    fn a_certificate_that_does_not_parse_is_named_by_its_fingerprint() {
        let der = cert();
        for len in 0..der.len() {
            // Every truncation: no panic, and a name either way.
            let name = client_identity(&der[..len]);
            assert!(name.starts_with("client-cert "), "{name}");
        }
        let name = client_identity(b"not a certificate");
        assert!(name.starts_with("client-cert sha256:") && name.len() == 35, "{name}");
    }
}
