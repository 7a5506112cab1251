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
        &[("WX_SHOP_SECRET", "x"), ("REDIS_PASSWORD", "y")],
    );
    assert!(ok, "{err}");

    // A real schema check (kubernetes-validate from PyPI, installed by make install-deps).
    let out = Command::new("python3")
        .args(["-m", "kubernetes_validate", "--strict", "--quiet"])
        .arg(format!(
            "{}/conf/k8s/sidecar.yaml",
            env!("CARGO_MANIFEST_DIR")
        ))
        .output()
        .expect("kubernetes-validate is installed (make install-deps)");
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
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
