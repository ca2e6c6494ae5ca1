//! Config text through the path `portcullis check` takes: the TOML and
//! environment layer (`config::load_str`), then validation, which reads the
//! key and token files the config names from a directory holding the test
//! fixtures' key files (mode 0600). Never panics.
//!
//! Only inputs whose file settings are plain names in that directory are
//! validated, so the fuzzer never reads other files (devices, `/proc`).
#![no_main]

use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::sync::LazyLock;

use libfuzzer_sys::fuzz_target;
use portcullis::config::raw::RawConfig;

/// The fixtures' key and token files, as the seeds in `fuzz/corpus/config`
/// (the fixture configs) name them.
static DIR: LazyLock<tempfile::TempDir> = LazyLock::new(|| {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let files = [
        ("alice.key", include_str!("../../tests/fixtures/config/valid/alice.key")),
        ("fw.key", include_str!("../../tests/fixtures/config/valid/fw.key")),
        (
            "admin.token",
            include_str!("../../tests/fixtures/config/valid/admin.token"),
        ),
        (
            "no-hmac.key",
            include_str!("../../tests/fixtures/config/invalid/no-hmac.key"),
        ),
        (
            "short-passphrase.key",
            include_str!("../../tests/fixtures/config/invalid/short-passphrase.key"),
        ),
    ];
    for (name, text) in files {
        let path = dir.path().join(name);
        std::fs::write(&path, text).expect("write a fixture key");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod 600");
    }
    // Readable by everyone, so the refusal path runs too.
    let open = dir.path().join("world-readable.key");
    std::fs::write(&open, include_str!("../../tests/fixtures/config/valid/fw.key")).expect("write");
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o644)).expect("chmod 644");
    dir
});

/// Whether every file the config names is a plain name: no directory part,
/// not absolute, not `..`.
fn plain_names(raw: &RawConfig) -> bool {
    let plain = |name: &Option<String>| {
        name.as_deref().is_none_or(|n| {
            let n = n.trim();
            !n.contains('/') && !n.contains('\0') && n != ".." && n != "."
        })
    };
    let admin = raw
        .admin
        .as_ref()
        .is_none_or(|a| plain(&a.tls_cert) && plain(&a.tls_key) && plain(&a.client_ca) && plain(&a.token_file));
    admin && raw.user.values().all(|u| plain(&u.key_file))
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(raw) = portcullis::config::load_str(text, "fuzz.toml", Default::default()) else {
        return;
    };
    if !plain_names(&raw) {
        return;
    }
    let dir: &Path = DIR.path();
    let _ = portcullis::config::validate_in(&raw, dir);
    let _ = portcullis::config::render(&raw);
});
