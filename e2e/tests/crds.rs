//! The CRDs on a real API server: install, printer columns, field docs, and
//! admission rules with the messages a user sees.

use carve_e2e::ControlPlane;

async fn control_plane_with_crds() -> ControlPlane {
    let cp = ControlPlane::start().await.expect("control plane starts");
    cp.install_crds().expect("kubectl apply -f crds/");
    cp
}

fn pool(name: &str, spec: &str) -> String {
    format!("apiVersion: carve.dev/v1alpha1\nkind: PodCIDR\nmetadata:\n  name: {name}\nspec:\n{spec}")
}

/// `kubectl apply` of `yaml`: Ok(stdout) or Err(stderr).
fn apply(cp: &ControlPlane, yaml: &str) -> Result<String, String> {
    let out = cp.kubectl_stdin(&["apply", "-f", "-"], yaml).unwrap();
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

fn header(table: &str) -> Vec<String> {
    table.lines().next().unwrap_or_default().split_whitespace().map(str::to_string).collect()
}

#[tokio::test]
async fn crds_install_with_columns_and_field_docs() {
    let cp = control_plane_with_crds().await;

    // The examples are accepted as they are shipped.
    apply(&cp, &std::fs::read_to_string(carve_e2e::repo_root().join("examples/overlay.yaml")).unwrap()).unwrap();
    cp.kubectl_ok(&[
        "patch",
        "pcidr",
        "overlay",
        "--subresource=status",
        "--type=merge",
        "-p",
        r#"{"status":{"allocated":2,"free":254}}"#,
    ])
    .unwrap();
    let pools = cp.kubectl_ok(&["get", "pcidr"]).unwrap();
    assert_eq!(header(&pools), ["NAME", "MODE", "CIDRS", "ALLOCATED", "FREE", "AGE"], "{pools}");
    let row: Vec<&str> = pools.lines().nth(1).unwrap().split_whitespace().collect();
    assert_eq!(&row[..5], ["overlay", "Overlay", r#"["10.244.0.0/16"]"#, "2", "254"], "{pools}");

    let nnc = r#"
apiVersion: carve.dev/v1alpha1
kind: NodeNetworkConfig
metadata:
  name: node-a
spec: {}
"#;
    apply(&cp, nnc).unwrap();
    let status = r#"{"status":{"pool":"dual-stack","mode":"Overlay","nodeIP":"192.168.0.4",
        "gateway":"10.244.3.1", "blockCIDRs":"10.244.3.0/24,fd12:3456:789a:0:3::/80",
        "blocks":[{"cidr":"10.244.3.0/24","family":"IPv4","gateway":"10.244.3.1"},
                  {"cidr":"fd12:3456:789a:0:3::/80","family":"IPv6","gateway":"fd12:3456:789a:0:3::1"}],
        "conditions":[{"type":"Ready","status":"True","reason":"BlocksCarved","message":"ok",
                       "lastTransitionTime":"2026-01-01T00:00:00Z"}]}}"#;
    cp.kubectl_ok(&["patch", "nnc", "node-a", "--subresource=status", "--type=merge", "-p", status]).unwrap();
    let table = cp.kubectl_ok(&["get", "nodenetworkconfigs"]).unwrap();
    assert_eq!(header(&table), ["NAME", "MODE", "POOL", "BLOCKS", "NODE", "IP", "READY", "AGE"], "{table}");
    let row: Vec<&str> = table.lines().nth(1).unwrap().split_whitespace().collect();
    assert_eq!(
        &row[..6],
        ["node-a", "Overlay", "dual-stack", "10.244.3.0/24,fd12:3456:789a:0:3::/80", "192.168.0.4", "True"],
        "{table}"
    );

    let explain = cp.kubectl_ok(&["explain", "nnc.status.blocks"]).unwrap();
    for text in ["Blocks carved for this node", "cidr", "family", "gateway", "allocationID", "new on every grant"] {
        assert!(explain.contains(text), "`kubectl explain nnc.status.blocks` lacks {text:?}:\n{explain}");
    }
    let explain = cp.kubectl_ok(&["explain", "nnc.spec"]).unwrap();
    for text in ["requestedIPs", "absolute", "releases", "allocation ID"] {
        assert!(explain.contains(text), "`kubectl explain nnc.spec` lacks {text:?}:\n{explain}");
    }
    let explain = cp.kubectl_ok(&["explain", "pcidr.spec.allocation"]).unwrap();
    for text in ["strategy", "maxBlocksPerNode", "releaseQuarantineSeconds"] {
        assert!(explain.contains(text), "`kubectl explain pcidr.spec.allocation` lacks {text:?}:\n{explain}");
    }
    let explain = cp.kubectl_ok(&["explain", "pcidr.spec.cidrs"]).unwrap();
    assert!(explain.contains("dual-stack"), "{explain}");
}

#[tokio::test]
async fn valid_pools_are_accepted() {
    let cp = control_plane_with_crds().await;
    for example in ["examples/overlay.yaml", "examples/dual-stack.yaml"] {
        let yaml = std::fs::read_to_string(carve_e2e::repo_root().join(example)).unwrap();
        let out = apply(&cp, &yaml).unwrap_or_else(|e| panic!("{example} rejected: {e}"));
        assert!(out.contains("created"), "{out}");
    }
    // Defaults: VNet with no block size takes /28 blocks from a /16.
    apply(&cp, &pool("vnet", "  mode: VNet\n  cidrs: [10.224.0.0/16]\n")).unwrap();
    let stored = cp.kubectl_ok(&["get", "pcidr", "dual-stack", "-o", "jsonpath={.spec.blockSize}"]).unwrap();
    assert_eq!(stored, r#"{"ipv4":24,"ipv6":80}"#);
    // Appending a CIDR (growing the pool) is allowed.
    apply(&cp, &pool("overlay", "  mode: Overlay\n  cidrs: [10.244.0.0/16, 10.245.0.0/16]\n  blockSize: {ipv4: 24}\n"))
        .unwrap();
}

#[tokio::test]
async fn invalid_pools_are_rejected_with_the_field_and_the_fix() {
    let cp = control_plane_with_crds().await;
    // (case, spec, field named in the error, message fragment)
    let cases = [
        ("not a CIDR", "  mode: Overlay\n  cidrs: [10.244.0.0]\n", "spec.cidrs", r#""10.244.0.0" is not a CIDR"#),
        ("garbage", "  mode: Overlay\n  cidrs: [ten.dot/8]\n", "spec.cidrs", r#""ten.dot/8" is not a CIDR"#),
        (
            "host bits",
            "  mode: Overlay\n  cidrs: [10.244.1.0/16]\n",
            "spec.cidrs",
            "10.244.1.0/16 is not the network address of its prefix",
        ),
        ("link-local", "  mode: Overlay\n  cidrs: [169.254.0.0/16]\n", "spec.cidrs", "overlaps 169.254.0.0/16"),
        ("azure 172.30", "  mode: VNet\n  cidrs: [172.30.4.0/24]\n", "spec.cidrs", "overlaps 172.30.0.0/16"),
        ("azure 172.31", "  mode: Overlay\n  cidrs: [172.31.0.0/16]\n", "spec.cidrs", "overlaps 172.31.0.0/16"),
        ("test-net-1", "  mode: VNet\n  cidrs: [192.0.2.0/24]\n", "spec.cidrs", "overlaps 192.0.2.0/24"),
        (
            "supernet of a forbidden range",
            "  mode: Overlay\n  cidrs: [172.16.0.0/12]\n",
            "spec.cidrs",
            "overlaps 172.30.0.0/16, a range reserved by the platform",
        ),
        (
            "overlapping CIDRs",
            "  mode: Overlay\n  cidrs: [10.244.0.0/16, 10.244.128.0/17]\n",
            "spec.cidrs",
            "CIDRs of a pool must not overlap or repeat",
        ),
        (
            "block shorter than the pool",
            "  mode: Overlay\n  cidrs: [10.244.0.0/16]\n  blockSize: {ipv4: 15}\n",
            "spec.blockSize.ipv4",
            "IPv4 block size (default /24 in Overlay, /28 in VNet) is shorter than the prefix of an IPv4 CIDR",
        ),
        (
            "dynamic blocks in an Overlay pool",
            "  mode: Overlay\n  cidrs: [10.244.0.0/16]\n  allocation: {strategy: Dynamic}\n",
            "spec.allocation.strategy",
            "Static and Dynamic need mode VNet",
        ),
        (
            "release threshold too close to the request threshold",
            "  mode: VNet\n  cidrs: [10.224.0.0/16]\n  allocation: {strategy: Dynamic, requestThresholdPercent: 60, releaseThresholdPercent: 120}\n",
            "spec.allocation.releaseThresholdPercent",
            "at least requestThresholdPercent + 100",
        ),
        (
            "default block shorter than a small pool",
            "  mode: Overlay\n  cidrs: [10.244.0.0/26]\n",
            "spec.blockSize.ipv4",
            "set spec.blockSize.ipv4 to at least the longest IPv4 prefix",
        ),
        (
            "IPv6 block shorter than the pool",
            "  mode: Overlay\n  cidrs: [fd12:3456:789a::/64]\n  blockSize: {ipv6: 48}\n",
            "spec.blockSize.ipv6",
            "IPv6 block size (default /80 in Overlay, /124 in VNet) is shorter than the prefix of an IPv6 CIDR",
        ),
        (
            "IPv4 block longer than /30",
            "  mode: Overlay\n  cidrs: [10.244.0.0/16]\n  blockSize: {ipv4: 31}\n",
            "spec.blockSize.ipv4",
            "must be 30 or less",
        ),
        (
            "IPv6 block longer than /126",
            "  mode: Overlay\n  cidrs: [fd12:3456:789a::/64]\n  blockSize: {ipv6: 127}\n",
            "spec.blockSize.ipv6",
            "must be 126 or less",
        ),
        (
            "unknown mode",
            "  mode: Underlay\n  cidrs: [10.244.0.0/16]\n",
            "spec.mode",
            "Unsupported value: \"Underlay\"",
        ),
    ];
    let mut failures = Vec::new();
    for (i, (case, spec, field, fragment)) in cases.iter().enumerate() {
        match apply(&cp, &pool(&format!("bad-{i}"), spec)) {
            Ok(out) => failures.push(format!("{case}: accepted ({out})")),
            Err(err) if err.contains(field) && err.contains(fragment) => {}
            Err(err) => failures.push(format!("{case}: expected {field:?} and {fragment:?} in:\n{err}")),
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));

    // Immutable after creation: mode and block sizes.
    apply(&cp, &pool("live", "  mode: Overlay\n  cidrs: [10.244.0.0/16]\n  blockSize: {ipv4: 24}\n")).unwrap();
    let err =
        apply(&cp, &pool("live", "  mode: VNet\n  cidrs: [10.244.0.0/16]\n  blockSize: {ipv4: 24}\n")).unwrap_err();
    assert!(err.contains("spec.mode") && err.contains("spec.mode is immutable"), "{err}");
    let err =
        apply(&cp, &pool("live", "  mode: Overlay\n  cidrs: [10.244.0.0/16]\n  blockSize: {ipv4: 26}\n")).unwrap_err();
    assert!(err.contains("spec.blockSize is immutable"), "{err}");
    let err =
        apply(&cp, &pool("live", "  mode: Overlay\n  cidrs: [10.244.0.0/16]\n  blockSize: {ipv4: 24, ipv6: 80}\n"))
            .unwrap_err();
    assert!(err.contains("spec.blockSize is immutable"), "adding a family's block size later: {err}");
}
