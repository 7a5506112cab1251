//! The deployment files in `conf/`: Kubernetes manifests pass a schema check
//! and carry a config the binary accepts; the systemd unit's commands exist.

use std::process::Command;

use crate::support::*;

fn conf(path: &str) -> String {
    std::fs::read_to_string(format!("{}/conf/{path}", env!("CARGO_MANIFEST_DIR"))).unwrap()
}

fn check_config(text: &str, env: &[(&str, &str)]) -> (bool, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.yaml");
    std::fs::write(&path, text).unwrap();
    let mut cmd = Command::new(BIN);
    cmd.args(["check", "--config"]).arg(&path);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Validates a manifest in `conf/` against the Kubernetes schemas.
fn schema_check(path: &str) {
    let out = Command::new("python3")
        .args(["-m", "kubernetes_validate", "--strict", "--quiet"])
        .arg(format!("{}/conf/{path}", env!("CARGO_MANIFEST_DIR")))
        .output()
        .expect("kubernetes-validate is installed (make install-deps)");
    assert!(
        out.status.success(),
        "{path}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn the_k8s_manifest_passes_the_schema_and_its_config_checks() {
    let text = conf("k8s/sidecar.yaml");
    let docs: Vec<serde_yaml_ng::Value> = serde_yaml_ng::Deserializer::from_str(&text)
        .map(|d| serde::Deserialize::deserialize(d).unwrap())
        .collect();
    let kinds: Vec<&str> = docs.iter().filter_map(|d| d["kind"].as_str()).collect();
    assert_eq!(kinds, ["Secret", "ConfigMap", "Deployment"]);
    let pod = &docs[2]["spec"]["template"]["spec"];
    let sidecar = &pod["initContainers"][0];
    assert_eq!(
        sidecar["restartPolicy"].as_str(),
        Some("Always"),
        "a native sidecar"
    );
    assert_eq!(
        sidecar["startupProbe"]["httpGet"]["path"].as_str(),
        Some("/readyz")
    );
    assert_eq!(
        sidecar["readinessProbe"]["httpGet"]["path"].as_str(),
        Some("/readyz")
    );
    assert_eq!(
        sidecar["livenessProbe"]["httpGet"]["path"].as_str(),
        Some("/healthz")
    );
    assert_eq!(
        pod["containers"][0]["env"][0]["value"].as_str(),
        Some("http://127.0.0.1:8080")
    );

    // The embedded config is one the binary accepts.
    let dir = tempfile::tempdir().unwrap();
    let mall = dir.path().join("mall");
    std::fs::write(&mall, "mall-secret").unwrap();
    let embedded = docs[1]["data"]["wxsidecar.yaml"]
        .as_str()
        .unwrap()
        .replace("/run/secrets/wxsidecar/mall", &mall.display().to_string());
    let (ok, err) = check_config(
        &embedded,
        &[
            ("WX_SHOP_SECRET", "x"),
            ("REDIS_PASSWORD", "y"),
            ("ADMIN_TOKEN", "0123456789abcdef0123"),
        ],
    );
    assert!(ok, "{err}");
    // The admin listener is off loopback: without its token it must not start.
    let open_admin = embedded.replace("  token: ${ADMIN_TOKEN}", "  protect_metrics: false");
    let (ok, err) = check_config(
        &open_admin,
        &[("WX_SHOP_SECRET", "x"), ("REDIS_PASSWORD", "y")],
    );
    assert!(!ok && err.contains("admin.token"), "{err}");

    // A real schema check (kubernetes-validate from PyPI, installed by make install-deps).
    schema_check("k8s/sidecar.yaml");
}

#[test]
fn the_transparent_manifest_passes_the_schema_and_matches_its_config() {
    let text = conf("k8s/transparent.yaml");
    let docs: Vec<serde_yaml_ng::Value> = serde_yaml_ng::Deserializer::from_str(&text)
        .map(|d| serde::Deserialize::deserialize(d).unwrap())
        .collect();
    let kinds: Vec<&str> = docs.iter().filter_map(|d| d["kind"].as_str()).collect();
    assert_eq!(
        kinds,
        ["Secret", "Secret", "Secret", "ConfigMap", "Deployment"]
    );
    let pod = &docs[4]["spec"]["template"]["spec"];
    // hostAliases send exactly the intercepted hosts (the default list) to loopback.
    let aliases = &pod["hostAliases"][0];
    assert_eq!(aliases["ip"].as_str(), Some("127.0.0.1"));
    let hosts: Vec<&str> = aliases["hostnames"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|h| h.as_str().unwrap())
        .collect();
    assert_eq!(hosts, wxsidecar::certs::WECHAT_HOSTS);
    // The CA key is mounted into the sidecar only.
    let mounts = |c: &serde_yaml_ng::Value| -> Vec<String> {
        c["volumeMounts"]
            .as_sequence()
            .unwrap()
            .iter()
            .map(|m| m["name"].as_str().unwrap().to_string())
            .collect()
    };
    let sidecar = &pod["initContainers"][0];
    assert!(mounts(sidecar).contains(&"ca-key".to_string()));
    let app = &pod["containers"][0];
    assert!(!mounts(app).contains(&"ca-key".to_string()));
    assert!(mounts(app).contains(&"ca-cert".to_string()));
    let env: Vec<&str> = app["env"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|e| e["name"].as_str().unwrap())
        .collect();
    for var in ["SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "NODE_EXTRA_CA_CERTS"] {
        assert!(env.contains(&var), "{var}");
    }

    // The embedded config, with a real CA in place of the mounted one.
    let ca = tempfile::tempdir().unwrap();
    let out = Command::new(BIN)
        .args(["ca", "init", "--out"])
        .arg(ca.path())
        .output()
        .unwrap();
    assert!(out.status.success());
    let embedded = docs[3]["data"]["wxsidecar.yaml"]
        .as_str()
        .unwrap()
        .replace(
            "/etc/wxsidecar-ca/ca.pem",
            &ca.path().join("ca.pem").display().to_string(),
        )
        .replace(
            "/run/secrets/wxsidecar-ca-key/ca-key.pem",
            &ca.path().join("ca-key.pem").display().to_string(),
        );
    let (ok, err) = check_config(
        &embedded,
        &[
            ("WX_SHOP_SECRET", "x"),
            ("ADMIN_TOKEN", "0123456789abcdef0123"),
        ],
    );
    assert!(ok, "{err}");

    schema_check("k8s/transparent.yaml");
}

#[test]
fn the_example_config_checks() {
    let (ok, err) = check_config(&conf("wxsidecar.yaml"), &[("WX_SHOP_SECRET", "x")]);
    assert!(ok, "{err}");
}

#[test]
fn the_systemd_unit_uses_commands_that_exist() {
    let unit = conf("systemd/wxsidecar.service");
    assert!(unit.contains("ExecReload=/bin/kill -QUIT $MAINPID"));
    assert!(unit.contains("run --daemon --upgrade --config"));
    let help = Command::new(BIN).args(["run", "--help"]).output().unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    assert!(
        help.contains("--upgrade") && help.contains("--daemon"),
        "{help}"
    );
    let docker = conf("Dockerfile");
    assert!(docker.contains("USER 10001") && docker.contains("ca-certificates"));
}
