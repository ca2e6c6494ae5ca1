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

fn gateway_docs() -> Vec<Value> {
    yaml_docs(&render(&repo_path("deploy/kubernetes/gateway")))
}

/// The gateway overlay's Deployment, its pod spec and its portcullis
/// container.
fn gateway_pod(docs: &[Value]) -> (&Value, &Value, &Value) {
    let deployments = kind(docs, "Deployment");
    assert_eq!(deployments.len(), 1, "one Deployment");
    let spec = &deployments[0]["spec"]["template"]["spec"];
    let gw = spec["containers"]
        .as_array()
        .and_then(|a| a.iter().find(|c| c["name"] == "portcullis"))
        .expect("portcullis among the containers");
    (deployments[0], spec, gw)
}

/// The pod spec and portcullis container of the `sidecar` or the
/// `gateway` overlay.
fn pod_of<'a>(overlay: &str, docs: &'a [Value]) -> (&'a Value, &'a Value) {
    match overlay {
        "sidecar" => sidecar_pod(docs),
        "gateway" => {
            let (_, spec, gw) = gateway_pod(docs);
            (spec, gw)
        }
        other => panic!("no overlay {other}"),
    }
}

const OVERLAYS: [&str; 2] = ["sidecar", "gateway"];

fn overlay_docs(overlay: &str) -> Vec<Value> {
    yaml_docs(&render(&repo_path(ROOT).join(overlay)))
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

/// The gateway container is probed on the admin port and its pod's grace
/// period outlasts its drain; returns its parsed config.
fn assert_probed_and_graceful(spec: &Value, gw: &Value, docs: &[Value]) -> toml::Table {
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
    let config = sidecar_config(docs, spec, gw);
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
    raw
}

#[test]
fn the_sidecar_is_native_probed_and_outlives_its_grace_period() {
    let docs = sidecar_docs();
    let (spec, gw) = sidecar_pod(&docs);
    assert_eq!(gw["restartPolicy"], "Always", "a native sidecar");
    let raw = assert_probed_and_graceful(spec, gw, &docs);

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
fn the_gateway_overlay_runs_replicas_that_share_one_redis() {
    let docs = gateway_docs();
    let (deployment, spec, gw) = gateway_pod(&docs);
    let replicas = deployment["spec"]["replicas"].as_u64().expect("spec.replicas");
    assert!(replicas >= 2, "{replicas} replica(s) share nothing worth sharing");
    let raw = assert_probed_and_graceful(spec, gw, &docs);

    // Every replica talks to the one Redis the overlay runs, by its
    // Service, with a password from the Secret rather than the config.
    let state = raw["state"].as_table().expect("[state]");
    assert_eq!(state["backend"].as_str(), Some("redis"));
    let url = state["url"].as_str().unwrap();
    let rest = url.strip_prefix("redis://").expect("a redis:// url");
    assert!(!rest.contains('@'), "credentials inline in {url}");
    let host_port = rest.split('/').next().unwrap();
    let (host, port) = host_port.rsplit_once(':').unwrap();
    let redis_svc = kind(&docs, "Service")
        .into_iter()
        .find(|s| s["metadata"]["name"] == host)
        .unwrap_or_else(|| panic!("no Service {host} for state.url"));
    let svc_port = &redis_svc["spec"]["ports"][0];
    assert_eq!(svc_port["port"].as_u64(), port.parse::<u64>().ok());
    let password_file = state["password_file"].as_str().expect("state.password_file");
    assert!(!password_file.starts_with('/'), "relative to /etc/portcullis");
    let redis_sts = kind(&docs, "StatefulSet")
        .into_iter()
        .find(|s| selects(&redis_svc["spec"]["selector"], &spec_labels(s)))
        .expect("a Redis StatefulSet behind the Service");
    let redis_spec = &redis_sts["spec"]["template"]["spec"];

    // Redis keeps the replay cache across its restarts: an append-only
    // file on a volume claim, synced on every write.
    let redis_conf = kind(&docs, "ConfigMap")
        .into_iter()
        .find_map(|c| c["data"]["redis.conf"].as_str())
        .expect("redis.conf in a ConfigMap");
    let directives: Vec<&str> = redis_conf
        .lines()
        .map(str::trim)
        .filter(|l| !l.starts_with('#'))
        .collect();
    for want in ["appendonly yes", "appendfsync always", "maxmemory-policy noeviction"] {
        assert!(directives.contains(&want), "redis.conf lacks {want}");
    }
    assert!(
        !directives.iter().any(|l| l.starts_with("requirepass")),
        "the Redis password is inline in a ConfigMap"
    );
    let data_mount = redis_spec["containers"][0]["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["mountPath"] == "/data")
        .expect("/data mounted");
    let claims: Vec<&Value> = redis_sts["spec"]["volumeClaimTemplates"]
        .as_array()
        .unwrap()
        .iter()
        .collect();
    assert!(
        claims.iter().any(|c| c["metadata"]["name"] == data_mount["name"]),
        "Redis data is not on a volume claim"
    );

    // The replicas reach Redis; Redis takes no one else.
    let policies = kind(&docs, "NetworkPolicy");
    let redis_policy = policies
        .iter()
        .find(|p| p["spec"]["podSelector"]["matchLabels"] == redis_svc["spec"]["selector"])
        .expect("a NetworkPolicy for Redis");
    let from = &redis_policy["spec"]["ingress"][0]["from"][0]["podSelector"]["matchLabels"];
    assert_eq!(from, &spec_labels(deployment), "Redis admits the replicas only");
    let gw_policy = policies
        .iter()
        .find(|p| p["spec"]["podSelector"]["matchLabels"] == spec_labels(deployment))
        .expect("a NetworkPolicy for the replicas");
    let egress_ports: BTreeSet<u64> = gw_policy["spec"]["egress"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|r| {
            r["ports"]
                .as_array()
                .unwrap()
                .iter()
                .map(|p| p["port"].as_u64().unwrap())
        })
        .collect();
    let upstream = raw["service"]["postgres"]["upstream"].as_str().unwrap();
    let upstream_port: u64 = upstream.rsplit_once(':').unwrap().1.parse().unwrap();
    assert_eq!(
        egress_ports,
        BTreeSet::from([upstream_port, port.parse().unwrap(), 53]),
        "egress: the upstream, Redis and DNS only"
    );

    // Disruptions take one replica at a time.
    let pdb = kind(&docs, "PodDisruptionBudget")
        .into_iter()
        .find(|p| p["spec"]["selector"]["matchLabels"] == spec_labels(deployment))
        .expect("a PodDisruptionBudget for the replicas");
    assert_eq!(pdb["spec"]["maxUnavailable"], 1);
}

/// The labels a workload's pods carry.
fn spec_labels(workload: &Value) -> Value {
    workload["spec"]["template"]["metadata"]["labels"].clone()
}

#[test]
fn the_configmap_proxy_toml_passes_check() {
    for overlay in OVERLAYS {
        let docs = overlay_docs(overlay);
        let (spec, gw) = pod_of(overlay, &docs);
        let config = sidecar_config(&docs, spec, gw);
        let dir = tempfile::tempdir().unwrap();
        let path = deploy::lay_out(dir.path(), "proxy.toml", &config);
        let out = deploy::check(&path).unwrap_or_else(|e| panic!("{overlay}: {e}"));
        assert!(out.contains("ok"), "{overlay}: {out}");
    }
}

#[test]
fn the_service_and_network_policy_admit_exactly_the_gateways_ports() {
    for overlay in OVERLAYS {
        let docs = overlay_docs(overlay);
        let (spec, gw) = pod_of(overlay, &docs);
        assert_ports(overlay, &docs, spec, gw);
    }
}

/// Whether `selector` (matchLabels) picks pods labelled `labels`.
fn selects(selector: &Value, labels: &Value) -> bool {
    selector
        .as_object()
        .is_some_and(|m| m.iter().all(|(k, v)| &labels[k] == v))
}

/// The NetworkPolicies that govern the pods running the gateway.
fn gateway_policies(docs: &[Value]) -> Vec<&Value> {
    let gateway_labels: Vec<&Value> = docs
        .iter()
        .filter(|d| {
            all_containers(&d["spec"]["template"]["spec"])
                .iter()
                .any(|c| c["name"] == "portcullis")
        })
        .map(|d| &d["spec"]["template"]["metadata"]["labels"])
        .collect();
    kind(docs, "NetworkPolicy")
        .into_iter()
        .filter(|p| {
            gateway_labels
                .iter()
                .any(|l| selects(&p["spec"]["podSelector"]["matchLabels"], l))
        })
        .collect()
}

fn assert_ports(overlay: &str, docs: &[Value], spec: &Value, gw: &Value) {
    let want = config_ports(&sidecar_config(docs, spec, gw));

    let services = kind(docs, "Service");
    let lb = services
        .iter()
        .find(|s| s["spec"]["type"] == "LoadBalancer")
        .unwrap_or_else(|| panic!("{overlay}: a LoadBalancer Service"));
    assert_eq!(
        lb["spec"]["externalTrafficPolicy"], "Local",
        "{overlay}: sources must survive the Service: externalTrafficPolicy Local"
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
    assert_eq!(exposed, want, "{overlay}: the LoadBalancer Service's ports");

    // The NetworkPolicy: the gateway's ports from anywhere, admin from
    // monitoring, nothing else.
    let np = gateway_policies(docs);
    assert_eq!(np.len(), 1, "{overlay}: one NetworkPolicy governs the gateway");
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
    assert_eq!(open, want, "{overlay}: ports open to every source");
    let limited: Vec<_> = admitted.iter().filter(|(_, _, limited)| *limited).collect();
    assert_eq!(
        limited,
        vec![&("TCP".to_string(), 9464, true)],
        "{overlay}: only admin is limited to some sources"
    );
}

#[test]
fn the_prometheus_rule_is_alerts_yaml_and_the_service_monitor_finds_the_admin_port() {
    for overlay in OVERLAYS {
        assert_monitoring(&overlay_docs(overlay));
    }
}

fn assert_monitoring(docs: &[Value]) {
    let rules = kind(docs, "PrometheusRule");
    assert_eq!(rules.len(), 1);
    let alerts = yaml_docs(&std::fs::read_to_string(repo_path(ALERTS)).unwrap());
    assert_eq!(
        rules[0]["spec"]["groups"], alerts[0]["groups"],
        "the PrometheusRule differs from {ALERTS}: run deploy/kubernetes/base/gen-prometheusrule.sh"
    );
    let monitors = kind(docs, "ServiceMonitor");
    assert_eq!(monitors.len(), 1);
    let selector = monitors[0]["spec"]["selector"]["matchLabels"].as_object().unwrap();
    let port = monitors[0]["spec"]["endpoints"][0]["port"].as_str().unwrap();
    let matching: Vec<_> = kind(docs, "Service")
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
