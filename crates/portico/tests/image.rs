//! `deploy/Dockerfile` and `scripts/image` build the same image: the same static target, binary
//! path, user and entrypoint, on an empty base. (`scripts/image` itself builds a release binary,
//! minutes on the build machines, so CI does not run it; this keeps it from drifting.)

use std::path::{Path, PathBuf};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(repo().join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

/// The value of `NAME=value` in the script.
fn script_var(script: &str, name: &str) -> String {
    script
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{name}=")))
        .unwrap_or_else(|| panic!("scripts/image sets {name}"))
        .trim()
        .to_string()
}

#[test]
fn the_dockerfile_and_the_image_script_agree() {
    let docker = read("deploy/Dockerfile");
    let script = read("scripts/image");
    let target = script_var(&script, "TARGET");
    let bin = script_var(&script, "BIN");
    let user = script_var(&script, "USER_ID");
    assert_eq!(target, "x86_64-unknown-linux-musl", "a static target");
    assert!(
        docker.contains(&format!("--target {target}")),
        "the Dockerfile builds for {target}"
    );
    assert!(
        docker.contains(&format!("rustup target add {target}")),
        "the Dockerfile adds {target}"
    );
    assert!(
        docker.contains(&format!("ENTRYPOINT [\"{bin}\"]")),
        "the Dockerfile's entrypoint is {bin}"
    );
    assert!(
        docker.contains(&format!("USER {user}")),
        "the Dockerfile runs as {user}"
    );
    assert!(docker.contains("CMD [\"run\"]") && script.contains("--cmd run"));
    // nft at the same path, with the libraries ldd names, and the same PATH
    let nft = script_var(&script, "NFT");
    assert!(docker.contains(&format!("cp /usr/sbin/nft /out{nft}")));
    let ldd_libs = "awk '$2 == \"=>\" && $3 ~ /^\\// {print $3} $1 ~ /^\\/.*ld-linux/ {print $1}'";
    assert!(
        docker.contains(ldd_libs),
        "the Dockerfile copies nft's libraries"
    );
    assert!(
        script.contains(ldd_libs),
        "the script copies nft's libraries"
    );
    let path = "PATH=/usr/local/bin:/usr/sbin:/usr/bin";
    assert!(docker.contains(&format!("ENV {path}")) && script.contains(&format!("--env {path}")));
    // the binary is stripped in both
    assert!(
        docker.contains("strip -o /portico") && script.contains("strip -o target/image/portico")
    );
    // both on an empty base, nothing pulled for the final image
    let last_from = docker
        .lines()
        .rfind(|l| l.starts_with("FROM "))
        .expect("a FROM line");
    assert_eq!(last_from.trim(), "FROM scratch");
    assert!(script.contains("buildah from scratch"));
    // the manifests run the image's entrypoint with arguments only, and probe over HTTP, so
    // nothing in deploy/ depends on another path inside the image
    for m in ["deploy/agent.yaml", "deploy/controller.yaml"] {
        let text = read(m);
        assert!(
            !text.contains("command:") && !text.contains("exec:"),
            "{m} runs a path inside the image"
        );
        assert!(text.contains("httpGet:"), "{m} probes over HTTP");
    }
}
