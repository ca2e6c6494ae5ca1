//! The Kubernetes manifests in `deploy/kubernetes/`: `kubectl kustomize`
//! renders every kustomization, `kubernetes-validate --strict` accepts the
//! result for Kubernetes 1.33 (native sidecars are GA there), yamllint
//! finds nothing, and a walk over the rendered objects holds them to what
//! the README promises: the restricted Pod Security Standard in every pod
//! template, portcullis as a native sidecar with probes on `/healthz` and
//! `/readyz`, a grace period above `shutdown_grace`, a ConfigMap whose
//! `proxy.toml` passes `portcullis check`, a Service and a NetworkPolicy
//! that expose exactly the gateway's ports, and a PrometheusRule equal to
//! `deploy/prometheus/alerts.yaml`.
//!
//! There is no cluster here: nothing is applied. The two Prometheus
//! Operator kinds have no schema in kubernetes-validate; their shape is
//! asserted here instead.

#![allow(
    clippy::unwrap_used,
    clippy::disallowed_methods,
    unreachable_pub,
    reason = "test code: a panic is the failure report, and real time is what is waited on"
)]

mod common;
mod deploy;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;
use serde_json::Value;

/// The Kubernetes version the manifests are validated against.
const KUBERNETES: &str = "1.33.0";
const ROOT: &str = "deploy/kubernetes";
const ALERTS: &str = "deploy/prometheus/alerts.yaml";

/// Every directory under deploy/kubernetes with a kustomization.
fn kustomizations() -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(repo_path(ROOT))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.join("kustomization.yaml").is_file())
        .collect();
    dirs.sort();
    assert!(
        dirs.iter().any(|d| d.ends_with("sidecar")),
        "no sidecar overlay: {dirs:?}"
    );
    dirs
}

fn output(cmd: &mut Command, hint: &str) -> (bool, String) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e} ({hint})"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

fn render(dir: &Path) -> String {
    let out = Command::new("kubectl")
        .args(["kustomize"])
        .arg(dir)
        .output()
        .expect("kubectl (scripts/install-test-deps installs it from PyPI where missing)");
    assert!(
        out.status.success(),
        "kubectl kustomize {}: {}",
        dir.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn yaml_docs(text: &str) -> Vec<Value> {
    use serde::Deserialize as _;
    serde_yaml::Deserializer::from_str(text)
        .map(|d| {
            let v = serde_yaml::Value::deserialize(d).expect("rendered YAML parses");
            serde_json::to_value(v).expect("YAML maps to JSON")
        })
        .filter(|v| !v.is_null())
        .collect()
}

fn sidecar_docs() -> Vec<Value> {
    yaml_docs(&render(&repo_path("deploy/kubernetes/sidecar")))
}

fn kind<'a>(docs: &'a [Value], kind: &str) -> Vec<&'a Value> {
    docs.iter().filter(|d| d["kind"] == kind).collect()
}

fn strs(v: &Value) -> Vec<&str> {
    v.as_array()
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default()
}

#[test]
fn every_kustomization_renders_and_validates_strictly_and_lints_clean() {
    let work = tempfile::tempdir().unwrap();
    let lint_config = repo_path("deploy/kubernetes/.yamllint.yaml");
    let (ok, out) = output(
        Command::new("yamllint")
            .args(["--strict", "-c"])
            .arg(&lint_config)
            .arg(repo_path(ROOT)),
        "Debian's yamllint",
    );
    assert!(ok, "yamllint on the sources:\n{out}");
    for dir in kustomizations() {
        let name = dir.file_name().unwrap().to_string_lossy().into_owned();
        let rendered = work.path().join(format!("{name}.yaml"));
        std::fs::write(&rendered, render(&dir)).unwrap();

        let (ok, out) = output(
            Command::new("kubernetes-validate")
                .args(["--strict", "-k", KUBERNETES])
                .arg(&rendered),
            "pip install kubernetes-validate",
        );
        assert!(ok, "kubernetes-validate {name}:\n{out}");
        for line in out.lines() {
            let crd = line
                .contains("Couldn't find schema for kind PrometheusRule with api version monitoring.coreos.com/v1")
                || line
                    .contains("Couldn't find schema for kind ServiceMonitor with api version monitoring.coreos.com/v1");
            assert!(
                line.starts_with("INFO") && line.contains(" passed for resource ") || crd,
                "kubernetes-validate {name}: {line}"
            );
        }

        let (ok, out) = output(
            Command::new("yamllint")
                .args(["--strict", "-c"])
                .arg(&lint_config)
                .arg(&rendered),
            "Debian's yamllint",
        );
        assert!(ok, "yamllint on the rendered {name}:\n{out}");
    }
}

/// (template owner, pod spec) of every pod template in `docs`.
fn pod_specs(docs: &[Value]) -> Vec<(String, &Value)> {
    let mut out = Vec::new();
    for d in docs {
        let name = format!(
            "{}/{}",
            d["kind"].as_str().unwrap_or(""),
            d["metadata"]["name"].as_str().unwrap_or("")
        );
        let spec = match d["kind"].as_str() {
            Some("Deployment" | "StatefulSet" | "DaemonSet" | "ReplicaSet" | "Job") => &d["spec"]["template"]["spec"],
            Some("CronJob") => &d["spec"]["jobTemplate"]["spec"]["template"]["spec"],
            Some("Pod") => &d["spec"],
            _ => continue,
        };
        out.push((name, spec));
    }
    out
}

fn all_containers(spec: &Value) -> Vec<&Value> {
    let mut v: Vec<&Value> = Vec::new();
    for key in ["initContainers", "containers", "ephemeralContainers"] {
        if let Some(a) = spec[key].as_array() {
            v.extend(a.iter());
        }
    }
    v
}

/// The `restricted` Pod Security Standard, field by field, for one pod.
/// The one capability an overlay adds to the gateway container (and so
/// runs it as uid 0), named by the overlay's directory; restricted
/// otherwise.
fn overlay_capability(dir: &Path) -> Option<&'static str> {
    match dir.file_name()?.to_str()? {
        "sidecar-raw" => Some("NET_RAW"),
        "sidecar-dark" => Some("NET_ADMIN"),
        _ => None,
    }
}

fn assert_restricted(owner: &str, spec: &Value, exception: Option<&str>) {
    for host in ["hostNetwork", "hostPID", "hostIPC"] {
        assert!(spec[host] != true, "{owner}: {host} is set");
    }
    for vol in spec["volumes"].as_array().into_iter().flatten() {
        assert!(vol.get("hostPath").is_none(), "{owner}: hostPath volume {vol}");
    }
    let pod = &spec["securityContext"];
    for c in all_containers(spec) {
        let name = format!("{owner} container {}", c["name"]);
        let sc = &c["securityContext"];
        let excepted = exception.filter(|_| c["name"] == "portcullis");
        assert!(sc["privileged"] != true, "{name}: privileged");
        assert_eq!(
            sc["allowPrivilegeEscalation"], false,
            "{name}: allowPrivilegeEscalation"
        );
        assert!(
            strs(&sc["capabilities"]["drop"]).contains(&"ALL"),
            "{name}: capabilities.drop lacks ALL"
        );
        let added = strs(&sc["capabilities"]["add"]);
        if let Some(cap) = excepted {
            // Added capabilities reach uid 0 only: the overlay's one
            // capability, as root, and nothing else.
            assert_eq!(added, [cap], "{name}: adds {added:?}");
            assert_eq!(sc["runAsUser"], 0, "{name}: {cap} needs uid 0");
            continue_checks(&name, c, sc, pod);
            continue;
        }
        assert!(
            added.iter().all(|c| *c == "NET_BIND_SERVICE"),
            "{name}: adds {added:?} (restricted allows NET_BIND_SERVICE only)"
        );
        assert!(
            sc["runAsNonRoot"] == true || (pod["runAsNonRoot"] == true && sc["runAsNonRoot"] != false),
            "{name}: runAsNonRoot"
        );
        assert!(sc["runAsUser"] != 0 && pod["runAsUser"] != 0, "{name}: runs as uid 0");
        continue_checks(&name, c, sc, pod);
    }
}

/// What every container holds to, capability overlays included.
fn continue_checks(name: &str, c: &Value, sc: &Value, pod: &Value) {
    {
        let seccomp = sc["seccompProfile"]["type"]
            .as_str()
            .or(pod["seccompProfile"]["type"].as_str());
        assert!(
            matches!(seccomp, Some("RuntimeDefault" | "Localhost")),
            "{name}: seccompProfile {seccomp:?}"
        );
        assert_eq!(sc["readOnlyRootFilesystem"], true, "{name}: readOnlyRootFilesystem");
        for r in ["requests", "limits"] {
            for res in ["cpu", "memory"] {
                assert!(c["resources"][r][res].is_string(), "{name}: resources.{r}.{res}");
            }
        }
    }
}

#[test]
fn every_pod_template_meets_the_restricted_pod_security_standard() {
    for dir in kustomizations() {
        let docs = yaml_docs(&render(&dir));
        let exception = overlay_capability(&dir);
        if let Some(cap) = exception {
            // The overlay says what the capability costs.
            let doc = std::fs::read_to_string(dir.join("kustomization.yaml")).unwrap();
            assert!(
                doc.contains("enforce=privileged") && doc.contains(cap.strip_prefix("NET_").unwrap()),
                "{}",
                dir.display()
            );
        }
        for (owner, spec) in pod_specs(&docs) {
            assert_restricted(&owner, spec, exception);
        }
    }
}

#[test]
fn the_raw_and_dark_overlays_run_the_sidecar_config_with_their_mode_and_pass_check() {
    for (overlay, line) in [
        ("sidecar-raw", "sensor = \"raw\""),
        ("sidecar-dark", "unauthorized = \"dark\""),
    ] {
        let docs = yaml_docs(&render(&repo_path(ROOT).join(overlay)));
        let (spec, gw) = sidecar_pod(&docs);
        let config = sidecar_config(&docs, spec, gw);
        assert!(config.lines().any(|l| l.trim() == line), "{overlay}: {config}");
        let dir = tempfile::tempdir().unwrap();
        let path = deploy::lay_out(dir.path(), "proxy.toml", &config);
        let out = deploy::check(&path).unwrap_or_else(|e| panic!("{overlay}: {e}"));
        assert!(out.contains("ok"), "{overlay}: {out}");
    }
}

/// The sidecar overlay's StatefulSet pod spec and its portcullis sidecar.
fn sidecar_pod(docs: &[Value]) -> (&Value, &Value) {
    let sts = kind(docs, "StatefulSet");
    assert_eq!(sts.len(), 1, "one StatefulSet");
    let spec = &sts[0]["spec"]["template"]["spec"];
    let gw = spec["initContainers"]
        .as_array()
        .and_then(|a| a.iter().find(|c| c["name"] == "portcullis"))
        .expect("portcullis among the initContainers");
    (spec, gw)
}

/// The ConfigMap's proxy.toml that the sidecar reads.
fn sidecar_config(docs: &[Value], spec: &Value, gw: &Value) -> String {
    let mount = gw["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["mountPath"] == "/etc/portcullis")
        .expect("a mount at /etc/portcullis");
    assert!(mount.get("subPath").is_none(), "subPath mounts never see updates");
    let vol = spec["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == mount["name"])
        .expect("the mounted volume");
    let cm_name = vol["projected"]["sources"]
        .as_array()
        .and_then(|s| s.iter().find_map(|s| s["configMap"]["name"].as_str()))
        .or(vol["configMap"]["name"].as_str())
        .expect("the volume holds a ConfigMap");
    let cm = kind(docs, "ConfigMap")
        .into_iter()
        .find(|c| c["metadata"]["name"] == cm_name)
        .unwrap_or_else(|| panic!("ConfigMap {cm_name} is not rendered"));
    cm["data"]["proxy.toml"]
        .as_str()
        .expect("proxy.toml in the ConfigMap")
        .to_string()
}

/// Each port the config listens on: ("TCP"|"UDP", port).
fn config_ports(config: &str) -> BTreeSet<(String, u16)> {
    let raw: toml::Table = toml::from_str(config).unwrap();
    let port_of = |s: &str| -> u16 { s.rsplit_once(':').unwrap().1.parse().unwrap() };
    let mut ports = BTreeSet::new();
    for svc in raw["service"].as_table().unwrap().values() {
        let proto = svc
            .get("protocol")
            .and_then(|p| p.as_str())
            .unwrap_or("tcp")
            .to_uppercase();
        ports.insert((proto, port_of(svc["listen"].as_str().unwrap())));
        if let Some(k) = svc.get("knock") {
            for key in ["sequence", "trap_ports"] {
                for step in k.get(key).and_then(|s| s.as_array()).into_iter().flatten() {
                    let (p, proto) = step.as_str().unwrap().split_once('/').unwrap();
                    ports.insert((proto.to_uppercase(), p.parse().unwrap()));
                }
            }
        }
    }
    if let Some(spa) = raw.get("spa") {
        ports.insert(("UDP".into(), port_of(spa["listen"].as_str().unwrap())));
    }
    ports
}

#[test]
fn the_sidecar_is_native_probed_and_outlives_its_grace_period() {
    let docs = sidecar_docs();
    let (spec, gw) = sidecar_pod(&docs);
    assert_eq!(gw["restartPolicy"], "Always", "a native sidecar");
    assert!(gw["image"].as_str().unwrap().contains("portcullis"));
    let admin_port = gw["ports"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "admin")
        .expect("an admin port")["containerPort"]
        .as_u64()
        .unwrap();
    for (probe, path) in [
        ("livenessProbe", "/healthz"),
        ("readinessProbe", "/readyz"),
        ("startupProbe", "/readyz"),
    ] {
        let get = &gw[probe]["httpGet"];
        assert_eq!(get["path"], path, "{probe}");
        assert!(
            get["port"] == "admin" || get["port"] == admin_port,
            "{probe} port {}",
            get["port"]
        );
    }
    let config = sidecar_config(&docs, spec, gw);
    let raw: toml::Table = toml::from_str(&config).unwrap();
    let admin_listen = raw["admin"]["listen"].as_str().unwrap();
    assert!(
        admin_listen.ends_with(&format!(":{admin_port}")),
        "admin listens on {admin_listen}"
    );
    let grace = humantime::parse_duration(raw["gateway"]["shutdown_grace"].as_str().unwrap()).unwrap();
    let termination = spec["terminationGracePeriodSeconds"]
        .as_u64()
        .expect("terminationGracePeriodSeconds");
    assert!(
        termination > grace.as_secs(),
        "terminationGracePeriodSeconds {termination} is not above shutdown_grace {grace:?}"
    );

    // PostgreSQL on loopback only, on the port the gateway forwards to.
    let upstream = raw["service"]["postgres"]["upstream"].as_str().unwrap();
    let (host, port) = upstream.rsplit_once(':').unwrap();
    assert_eq!(host, "127.0.0.1");
    let pg = spec["containers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "postgres")
        .unwrap();
    let args = strs(&pg["args"]).join(" ");
    assert!(args.contains("listen_addresses=127.0.0.1"), "{args}");
    assert!(args.contains(&format!("port={port}")), "{args}");
    assert!(pg.get("ports").is_none(), "PostgreSQL declares no port of its own");
}

#[test]
fn the_configmap_proxy_toml_passes_check() {
    let docs = sidecar_docs();
    let (spec, gw) = sidecar_pod(&docs);
    let config = sidecar_config(&docs, spec, gw);
    let dir = tempfile::tempdir().unwrap();
    let path = deploy::lay_out(dir.path(), "proxy.toml", &config);
    let out = deploy::check(&path).unwrap_or_else(|e| panic!("{e}"));
    assert!(out.contains("ok"), "{out}");
}

#[test]
fn the_service_and_network_policy_admit_exactly_the_gateways_ports() {
    let docs = sidecar_docs();
    let (spec, gw) = sidecar_pod(&docs);
    let want = config_ports(&sidecar_config(&docs, spec, gw));

    let services = kind(&docs, "Service");
    let lb = services
        .iter()
        .find(|s| s["spec"]["type"] == "LoadBalancer")
        .expect("a LoadBalancer Service");
    assert_eq!(
        lb["spec"]["externalTrafficPolicy"], "Local",
        "sources must survive the Service: externalTrafficPolicy Local"
    );
    let exposed: BTreeSet<(String, u16)> = lb["spec"]["ports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["protocol"].as_str().unwrap_or("TCP").to_string(),
                p["port"].as_u64().unwrap() as u16,
            )
        })
        .collect();
    assert_eq!(exposed, want, "the LoadBalancer Service's ports");

    // The NetworkPolicy: the gateway's ports from anywhere, admin from
    // monitoring, nothing else.
    let np = kind(&docs, "NetworkPolicy");
    assert_eq!(np.len(), 1);
    let mut admitted = BTreeSet::new();
    for rule in np[0]["spec"]["ingress"].as_array().unwrap() {
        for p in rule["ports"].as_array().expect("every rule names its ports") {
            let proto = p["protocol"].as_str().unwrap_or("TCP").to_string();
            let from = p["port"].as_u64().unwrap() as u16;
            let to = p["endPort"].as_u64().map_or(from, |e| e as u16);
            for port in from..=to {
                admitted.insert((proto.clone(), port, rule.get("from").is_some()));
            }
        }
    }
    let open: BTreeSet<(String, u16)> = admitted
        .iter()
        .filter(|(_, _, limited)| !limited)
        .map(|(p, n, _)| (p.clone(), *n))
        .collect();
    assert_eq!(open, want, "ports open to every source");
    let limited: Vec<_> = admitted.iter().filter(|(_, _, limited)| *limited).collect();
    assert_eq!(
        limited,
        vec![&("TCP".to_string(), 9464, true)],
        "only admin is limited to some sources"
    );
}

#[test]
fn the_prometheus_rule_is_alerts_yaml_and_the_service_monitor_finds_the_admin_port() {
    let docs = sidecar_docs();
    let rules = kind(&docs, "PrometheusRule");
    assert_eq!(rules.len(), 1);
    let alerts = yaml_docs(&std::fs::read_to_string(repo_path(ALERTS)).unwrap());
    assert_eq!(
        rules[0]["spec"]["groups"], alerts[0]["groups"],
        "the PrometheusRule differs from {ALERTS}: run deploy/kubernetes/base/gen-prometheusrule.sh"
    );
    let monitors = kind(&docs, "ServiceMonitor");
    assert_eq!(monitors.len(), 1);
    let selector = monitors[0]["spec"]["selector"]["matchLabels"].as_object().unwrap();
    let port = monitors[0]["spec"]["endpoints"][0]["port"].as_str().unwrap();
    let matching: Vec<_> = kind(&docs, "Service")
        .into_iter()
        .filter(|s| selector.iter().all(|(k, v)| &s["metadata"]["labels"][k] == v))
        .collect();
    assert_eq!(matching.len(), 1, "the ServiceMonitor selects one Service");
    let svc = matching[0];
    assert!(svc["spec"]["type"] != "LoadBalancer", "metrics stay inside the cluster");
    assert!(
        svc["spec"]["ports"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["name"] == port),
        "the metrics Service has no port {port}"
    );
}
