//! The examples in docs/ are real: the topology file in docs/topology.md parses and
//! gives the verdict it was written for, and the JSON examples in docs/json.md use the
//! field names the CLI prints.

use peerdma::fabric::import::file;
use peerdma::fabric::{calc_map_type_and_dist, MapType};

fn blocks(doc: &str, lang: &str) -> Vec<String> {
    let text = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../docs")
            .join(doc),
    )
    .unwrap();
    let fence = format!("```{lang}\n");
    text.split(&fence)
        .skip(1)
        .map(|b| b.split("```").next().unwrap().to_string())
        .collect()
}

#[test]
fn topology_doc_example_parses_and_routes_through_the_switch() {
    let examples = blocks("topology.md", "toml");
    assert_eq!(examples.len(), 1);
    let t = file::parse("docs/topology.md", &examples[0]).unwrap();
    let v = calc_map_type_and_dist(
        &t,
        t.find("0000:03:00.0").unwrap(),
        t.find("0000:04:00.0").unwrap(),
    );
    assert_eq!((v.map_type, v.distance), (MapType::BusAddr, 4));
    assert_eq!(t.source(), "two-drive box");
}

#[test]
fn json_doc_examples_are_valid_json() {
    for b in blocks("json.md", "json") {
        let v: serde_json::Value = serde_json::from_str(&b).unwrap_or_else(|e| panic!("{e}\n{b}"));
        assert!(v["schema"].as_str().unwrap().starts_with("peerdma-"));
    }
}
