//! Every config shipped under `deploy/` is a fixture: the examples in
//! `deploy/examples/`, the container image's and the Kubernetes sidecar's.
//! Laid out with the secrets it names, each passes `portcullis check`, and
//! each one that guards a port below 1024 says how to bind it.

#![allow(
    clippy::unwrap_used,
    clippy::disallowed_methods,
    unreachable_pub,
    reason = "test code: a panic is the failure report, and real time is what is waited on"
)]

mod common;
mod deploy;

use common::*;

fn examples() -> Vec<std::path::PathBuf> {
    let mut files: Vec<_> = std::fs::read_dir(repo_path("deploy/examples"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .collect();
    files.sort();
    files.push(repo_path("deploy/container/proxy.toml"));
    files.push(repo_path("deploy/kubernetes/sidecar/proxy.toml"));
    files
}

#[test]
fn every_example_passes_check() {
    let files = examples();
    let names: Vec<_> = files
        .iter()
        .map(|f| f.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    for want in ["postgres.toml", "ssh.toml", "redis.toml", "prometheus-exporter.toml"] {
        assert!(
            names.iter().any(|n| n == want),
            "deploy/examples lacks {want}: {names:?}"
        );
    }
    for f in files {
        let dir = tempfile::tempdir().unwrap();
        let text = std::fs::read_to_string(&f).unwrap();
        let name = f.file_name().unwrap().to_str().unwrap();
        let laid = deploy::lay_out(dir.path(), name, &text);
        let out = deploy::check(&laid).unwrap_or_else(|e| panic!("{e}"));
        assert!(out.contains("ok"), "{out}");
    }
}

#[test]
fn an_example_on_a_low_port_says_how_to_bind_it() {
    for f in examples() {
        let text = std::fs::read_to_string(&f).unwrap();
        let raw: toml::Table = toml::from_str(&text).unwrap();
        let low = raw["service"].as_table().unwrap().values().any(|s| {
            let listen = s["listen"].as_str().unwrap();
            let port: u16 = listen.rsplit_once(':').unwrap().1.parse().unwrap();
            port < 1024
        });
        if low {
            assert!(
                text.contains("CAP_NET_BIND_SERVICE") && text.contains("ip_unprivileged_port_start"),
                "{} guards a port below 1024 without the note on binding it",
                f.display()
            );
        }
    }
}
