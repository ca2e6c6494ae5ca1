//! The `[admin]` section: where the admin endpoint listens, its optional
//! TLS files, who may use its mutating endpoints, and whether reads need
//! the token too.
//!
//! Validation reads the files the section names (the token, the TLS
//! certificate, key and client CA), so `portcullis check` reports a missing
//! or unusable file with its key path instead of `serve` failing later.

use std::net::SocketAddr;
use std::path::PathBuf;

use super::raw::RawAdmin;
use super::{Service, Validator};
use crate::secret::{check_private, read_private, PrivateFileError, Secret};
use crate::step::{Proto, Step};

/// Where the admin endpoint listens when `[admin]` names no address.
pub const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:9464";

/// Shortest accepted bearer token, so a token is never guessable.
const MIN_TOKEN_LEN: usize = 16;

/// The validated `[admin]` section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Admin {
    pub listen: SocketAddr,
    pub tls: Option<AdminTls>,
    /// Bearer token that authorises the mutating endpoints. Never logged;
    /// compared in constant time.
    pub token: Option<Secret>,
    /// Whether anyone who can reach a loopback-bound admin listener may use
    /// the mutating endpoints without a token or client certificate. Has no
    /// effect once a token is configured: the token is then required
    /// everywhere, loopback included.
    pub allow_loopback_mutations: bool,
    /// Whether `/metrics` and `/v1/grants` need the token (or a verified
    /// client certificate) too; the probes `/healthz` and `/readyz` stay
    /// open.
    pub require_token_for_reads: bool,
}

/// TLS files of the admin endpoint, resolved from the config's directory.
/// The endpoint rereads them when they change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminTls {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// When set, client certificates are verified against it; a verified
    /// client may use the mutating endpoints.
    pub client_ca: Option<PathBuf>,
}

impl Validator {
    pub(super) fn admin(&mut self, raw: &RawAdmin) -> Option<Admin> {
        let before = self.problems.len();
        let text = raw.listen.as_deref().unwrap_or(DEFAULT_ADMIN_LISTEN);
        let listen = match text.trim().parse::<SocketAddr>() {
            Ok(a) => Some(a),
            Err(_) => {
                self.problem(
                    "admin.listen",
                    format!("{text:?} is not IP:PORT (e.g. \"{DEFAULT_ADMIN_LISTEN}\")"),
                );
                None
            }
        };
        let tls = self.admin_tls(raw);
        let token = raw.token_file.as_deref().and_then(|f| self.token(f));
        let require_token_for_reads = raw.require_token_for_reads.unwrap_or(false);
        if require_token_for_reads && raw.token_file.is_none() && raw.client_ca.is_none() {
            self.problem(
                "admin.require_token_for_reads",
                "reads cannot need a token when none is configured: set token_file (or client_ca)",
            );
        }
        if self.problems.len() > before {
            return None;
        }
        Some(Admin {
            listen: listen?,
            tls,
            token,
            allow_loopback_mutations: raw.allow_loopback_mutations.unwrap_or(true),
            require_token_for_reads,
        })
    }

    fn admin_tls(&mut self, raw: &RawAdmin) -> Option<AdminTls> {
        let path = |f: &String| self.base.join(f.trim());
        let (cert, key) = match (&raw.tls_cert, &raw.tls_key) {
            (Some(c), Some(k)) => (path(c), path(k)),
            (None, None) => {
                if raw.client_ca.is_some() {
                    self.problem(
                        "admin.client_ca",
                        "client certificates need TLS: set tls_cert and tls_key too",
                    );
                }
                return None;
            }
            (Some(_), None) => {
                self.problem(
                    "admin.tls_key",
                    "missing: tls_cert needs the PEM file of its private key",
                );
                return None;
            }
            (None, Some(_)) => {
                self.problem(
                    "admin.tls_cert",
                    "missing: tls_key needs the PEM file of its certificate chain",
                );
                return None;
            }
        };
        let tls = AdminTls {
            cert,
            key,
            client_ca: raw.client_ca.as_ref().map(path),
        };
        // The private key gets the key-file rule; the endpoint's own loader
        // reads it (and rereads it when it changes).
        match check_private(&tls.key) {
            Ok(Some(w)) => self.warning("admin.tls_key", w.to_string()),
            Ok(None) => {}
            // A missing file is reported by the loader below.
            Err(PrivateFileError::Read { .. }) => {}
            Err(e) => {
                self.problem("admin.tls_key", e.to_string());
                return None;
            }
        }
        if let Err(e) = super::pem::load(&tls) {
            self.problem(format!("admin.{}", e.key), e.message);
            return None;
        }
        Some(tls)
    }

    fn token(&mut self, file: &str) -> Option<Secret> {
        let path = self.base.join(file.trim());
        let file = match read_private(&path) {
            Ok(f) => f,
            Err(e) => {
                self.problem("admin.token_file", e.to_string());
                return None;
            }
        };
        if let Some(w) = &file.warning {
            self.warning("admin.token_file", w.to_string());
        }
        // Editors and `echo` end files with a newline; it is not part of
        // the token.
        let bytes = file.bytes.trim_ascii_end();
        let len = bytes.len();
        if len < MIN_TOKEN_LEN {
            self.problem(
                "admin.token_file",
                format!(
                    "the token in {} is shorter than {MIN_TOKEN_LEN} characters: make a long random one, e.g. \
                     `(umask 077; head -c 32 /dev/urandom | base64 > {})`",
                    path.display(),
                    path.display()
                ),
            );
            return None;
        }
        if !bytes.iter().all(|b| b.is_ascii_graphic()) {
            self.problem(
                "admin.token_file",
                format!(
                    "the token in {} must be printable ASCII without spaces (it is sent in an HTTP header)",
                    path.display()
                ),
            );
            return None;
        }
        Some(Secret::from_slice(bytes))
    }

    /// The admin listener must not take a guarded or TCP knock endpoint.
    pub(super) fn admin_endpoint(&mut self, admin: &Admin, services: &[Service]) {
        let ours = Step {
            proto: Proto::Tcp,
            addr: admin.listen,
        };
        self.own_endpoint("admin.listen", ours, services);
    }
}

#[cfg(test)]
mod tests {
    use crate::config::{load_with_env, validate_in, ConfigError};
    use std::path::Path;

    const SERVICE: &str = r#"
[service.echo]
listen = "127.0.0.1:15000"
upstream = "127.0.0.1:15001"
knock = { sequence = ["17001/udp", "17003/udp", "17002/udp"] }
"#;

    fn load(dir: &Path, admin: &str, env: &[(&str, &str)]) -> Result<crate::config::Config, ConfigError> {
        let path = dir.join("proxy.toml");
        std::fs::write(&path, format!("{admin}\n{SERVICE}")).unwrap();
        let env = env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        validate_in(&load_with_env(&path, env)?, dir)
    }

    /// Writes a token file only its owner may read, as the rule demands.
    fn write_private(path: &Path, text: &str) {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::write(path, text).unwrap();
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
    }

    fn paths(err: ConfigError) -> Vec<String> {
        err.problems.into_iter().map(|p| p.path).collect()
    }

    #[test]
    fn the_section_is_optional_and_its_listen_has_a_default() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(load(dir.path(), "", &[]).unwrap().admin, None);
        let a = load(dir.path(), "[admin]", &[]).unwrap().admin.unwrap();
        assert_eq!(a.listen, super::DEFAULT_ADMIN_LISTEN.parse().unwrap());
        assert!(a.allow_loopback_mutations);
        assert!(!a.require_token_for_reads);
        assert_eq!(a.token, None);
        assert_eq!(a.tls, None);
    }

    #[test]
    fn the_environment_can_add_and_change_the_section() {
        let dir = tempfile::tempdir().unwrap();
        let a = load(
            dir.path(),
            "",
            &[
                ("PORTCULLIS__ADMIN__LISTEN", "127.0.0.1:0"),
                ("PORTCULLIS__ADMIN__ALLOW_LOOPBACK_MUTATIONS", "false"),
            ],
        )
        .unwrap()
        .admin
        .unwrap();
        assert_eq!(a.listen, "127.0.0.1:0".parse().unwrap());
        assert!(!a.allow_loopback_mutations);
    }

    #[test]
    fn the_token_is_read_from_a_file_relative_to_the_config_and_trimmed() {
        let dir = tempfile::tempdir().unwrap();
        write_private(&dir.path().join("admin.token"), "0123456789abcdef-token\n");
        let a = load(dir.path(), "[admin]\ntoken_file = \"admin.token\"", &[])
            .unwrap()
            .admin
            .unwrap();
        let token = a.token.as_ref().unwrap();
        assert_eq!(token.expose(), b"0123456789abcdef-token");
        assert!(
            !format!("{a:?}").contains("0123456789abcdef"),
            "the token leaked into Debug"
        );
    }

    #[test]
    fn bad_admin_settings_are_reported_with_their_key_paths() {
        let dir = tempfile::tempdir().unwrap();
        write_private(&dir.path().join("short.token"), "abc\n");
        let cases = [
            ("[admin]\nlisten = \"localhost\"", "admin.listen"),
            ("[admin]\nlisten = \"127.0.0.1:15000\"", "admin.listen"),
            ("[admin]\ntoken_file = \"missing.token\"", "admin.token_file"),
            ("[admin]\ntoken_file = \"short.token\"", "admin.token_file"),
            ("[admin]\ntls_cert = \"cert.pem\"", "admin.tls_key"),
            ("[admin]\ntls_key = \"key.pem\"", "admin.tls_cert"),
            ("[admin]\nclient_ca = \"ca.pem\"", "admin.client_ca"),
            (
                "[admin]\ntls_cert = \"missing.pem\"\ntls_key = \"missing.key\"",
                "admin.tls_cert",
            ),
            ("[admin]\nbogus = 1", "admin.bogus"),
            (
                "[admin]\nrequire_token_for_reads = true",
                "admin.require_token_for_reads",
            ),
        ];
        for (text, want) in cases {
            let err = load(dir.path(), text, &[]).unwrap_err();
            assert_eq!(paths(err.clone()), vec![want.to_string()], "{text}: {err}");
        }
    }

    #[test]
    fn a_token_file_other_users_can_read_is_refused() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let token = dir.path().join("admin.token");
        write_private(&token, "0123456789abcdef-token\n");
        std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = load(dir.path(), "[admin]\ntoken_file = \"admin.token\"", &[]).unwrap_err();
        assert_eq!(err.problems.len(), 1, "{err}");
        assert_eq!(err.problems[0].path, "admin.token_file");
        let want = format!(
            "{} is readable by other users (mode 0644): run `chmod 600 {}`",
            token.display(),
            token.display()
        );
        assert_eq!(err.problems[0].message, want);
        assert!(!err.to_string().contains("0123456789abcdef"), "{err}");

        // Group access is allowed (with a warning in the log).
        std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o640)).unwrap();
        assert!(load(dir.path(), "[admin]\ntoken_file = \"admin.token\"", &[]).is_ok());
    }

    #[test]
    fn a_tls_key_other_users_can_read_is_refused() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("tls.key");
        std::fs::write(&key, "not a key").unwrap();
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o604)).unwrap();
        let err = load(
            dir.path(),
            "[admin]\ntls_cert = \"tls.pem\"\ntls_key = \"tls.key\"",
            &[],
        )
        .unwrap_err();
        assert_eq!(paths(err.clone()), vec!["admin.tls_key".to_string()], "{err}");
        assert!(
            err.to_string().contains(&format!("chmod 600 {}", key.display())),
            "{err}"
        );
    }
}
