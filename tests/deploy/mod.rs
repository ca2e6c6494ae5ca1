//! Shared by the deployment tests: lays a shipped config out in a
//! directory with the secrets it names made fresh (keys from
//! `portcullis keygen`, a random admin token), as an operator would
//! before the first start, and runs `portcullis check` on it.

#![allow(dead_code)]

use std::path::{Path, PathBuf};

use super::common::{run_bin, BIN};

/// Writes `config` as `dir/name` and every file it names under `dir`:
/// `user.*.key_file` from `portcullis keygen`, `admin.token_file` random.
pub fn lay_out(dir: &Path, name: &str, config: &str) -> PathBuf {
    let parsed: toml::Table = toml::from_str(config).unwrap_or_else(|e| panic!("{name}: not TOML: {e}"));
    let mut secrets: Vec<(String, Vec<u8>)> = Vec::new();
    if let Some(users) = parsed.get("user").and_then(|u| u.as_table()) {
        for (user, t) in users {
            if let Some(f) = t.get("key_file").and_then(|f| f.as_str()) {
                let (code, key, err) = run_bin(&["keygen"], &[]);
                assert_eq!(code, 0, "keygen for {user}: {err}");
                secrets.push((f.to_string(), key.into_bytes()));
            }
        }
    }
    if let Some(f) = parsed
        .get("admin")
        .and_then(|a| a.get("token_file"))
        .and_then(|f| f.as_str())
    {
        secrets.push((f.to_string(), random_token().into_bytes()));
    }
    for (rel, content) in secrets {
        assert!(!rel.starts_with('/'), "{name}: {rel} must be relative to the config");
        let path = dir.join(&rel);
        std::fs::create_dir_all(path.parent().expect("a file has a parent")).unwrap();
        std::fs::write(path, content).unwrap();
    }
    let path = dir.join(name);
    std::fs::write(&path, config).unwrap();
    path
}

/// 64 hex characters from the kernel's random source.
pub fn random_token() -> String {
    let mut bytes = [0u8; 32];
    std::io::Read::read_exact(&mut std::fs::File::open("/dev/urandom").unwrap(), &mut bytes).unwrap();
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// `portcullis check` on `path`: Ok(stdout) or Err(the whole output).
pub fn check(path: &Path) -> Result<String, String> {
    let (code, out, err) = run_bin(&["check", "-c", path.to_str().expect("utf-8 path")], &[]);
    if code == 0 {
        Ok(out)
    } else {
        Err(format!("{BIN} check {}: exit {code}\n{out}{err}", path.display()))
    }
}
