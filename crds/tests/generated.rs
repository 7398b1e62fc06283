//! The committed CRD YAML must be exactly what the Rust types generate.

use std::path::Path;

/// crds/ for `kubectl apply -f crds/`, and the Helm chart's crds/ (Helm
/// installs those before the templates and never deletes them).
const CRD_DIRS: [&str; 2] = [".", "../charts/carve/crds"];

#[test]
fn committed_crd_yaml_matches_the_types() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut stale = Vec::new();
    for dir in CRD_DIRS {
        for (name, want) in carve_crds::crd_files().unwrap() {
            let got = std::fs::read_to_string(root.join(dir).join(&name)).unwrap_or_default();
            if got != want {
                stale.push(format!("{dir}/{name}"));
            }
        }
    }
    assert!(stale.is_empty(), "{stale:?} differ from the Rust types; run `make crds` and commit the result");
}

#[test]
fn crds_dir_holds_only_the_generated_manifests() {
    // `kubectl apply -f crds/` applies every .yaml/.yml/.json file in the
    // folder, Helm every file in the chart's crds/.
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut want: Vec<String> = carve_crds::crd_files().unwrap().into_iter().map(|(n, _)| n).collect();
    want.sort();
    for dir in CRD_DIRS {
        let mut got: Vec<String> = std::fs::read_dir(root.join(dir))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".yaml") || n.ends_with(".yml") || n.ends_with(".json"))
            .collect();
        got.sort();
        assert_eq!(got, want, "{dir}");
    }
}

#[test]
fn schema_carries_the_admission_rules_and_columns() {
    let crds = carve_crds::crds();
    let pool = serde_json::to_value(&crds[0]).unwrap();
    let text = pool.to_string();
    assert!(text.contains("isCIDR(c)"), "cidr parse rule missing");
    assert!(text.contains("192.0.2.0/24"), "forbidden ranges missing");
    assert!(text.contains("self == oldSelf"), "immutability rules missing");
    let names: Vec<&str> =
        pool["spec"]["names"]["shortNames"].as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
    assert_eq!(names, ["pcidr"]);
    assert_eq!(pool["spec"]["scope"], "Cluster");
    let nnc = serde_json::to_value(&crds[1]).unwrap();
    assert_eq!(nnc["spec"]["names"]["shortNames"][0], "nnc");
    let columns: Vec<&str> = nnc["spec"]["versions"][0]["additionalPrinterColumns"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(columns, ["Mode", "Pool", "Blocks", "Node IP", "Ready", "Age"]);
}
