//! `peerdma topo --dot` / `--svg FILE`: the PCIe tree as a picture, as hwloc's lstopo
//! draws a machine. Host bridges at the top, then root ports, switch ports and
//! endpoints, each edge labelled with the link below it. With `--explain A B` the path
//! between the pair is drawn thick in the colour of the kernel's verdict: green by bus
//! address through a common bridge, orange through the host bridge, red not supported.
//! The tree is written as Graphviz DOT; the SVG is laid out and drawn by the layout-rs
//! crate from that same DOT.

use std::collections::BTreeSet;
use std::fmt::Write as _;

use anyhow::{anyhow, Result};
use peerdma::fabric::{calc_map_type_and_dist, DeviceClass, FnId, MapType, PortKind, Topology};

/// The colour of a verdict's path.
pub fn verdict_colour(m: MapType) -> &'static str {
    match m {
        MapType::BusAddr => "green",
        MapType::ThruHostBridge => "orange",
        _ => "red",
    }
}

fn fill(topo: &Topology, id: FnId) -> &'static str {
    let f = topo.function(id);
    match f.kind {
        PortKind::Endpoint => match f.device_class() {
            DeviceClass::Gpu => "palegreen",
            DeviceClass::Nic => "lightblue",
            DeviceClass::Nvme | DeviceClass::Storage => "moccasin",
            _ => "white",
        },
        PortKind::HostBridge => "lightgray",
        _ => "whitesmoke",
    }
}

fn kind_word(k: PortKind) -> &'static str {
    match k {
        PortKind::Endpoint => "endpoint",
        PortKind::HostBridge => "host bridge",
        PortKind::RootPort => "root port",
        PortKind::SwitchUpstream => "switch upstream",
        PortKind::SwitchDownstream => "switch downstream",
        PortKind::PciBridge => "PCI bridge",
    }
}

/// A function's node name: its BDF with `_` for the punctuation.
fn node(topo: &Topology, id: FnId) -> String {
    format!(
        "f_{}",
        topo.function(id).bdf.to_string().replace([':', '.'], "_")
    )
}

/// Quotes `s` for a DOT string.
fn q(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

/// A device to draw as having moved data: its node and the links its traffic crossed
/// (up to its switch for peer traffic under one, up to the host bridge otherwise) in
/// `colour`, with `note` under its label.
#[derive(Clone, Debug)]
pub struct Mark {
    /// The device.
    pub id: FnId,
    /// The colour.
    pub colour: &'static str,
    /// What it moved.
    pub note: String,
    /// Whether its traffic stayed under its switch.
    pub under_switch: bool,
}

/// The tree as DOT; `pair` (provider, client) highlights the path between them.
pub fn dot(topo: &Topology, pair: Option<(FnId, FnId)>) -> String {
    dot_marked(topo, pair, &[])
}

/// The links `m`'s traffic crossed, by the function below each link.
fn mark_links(topo: &Topology, m: &Mark) -> Vec<FnId> {
    let mut out = Vec::new();
    for id in topo.upstream_path(m.id) {
        if m.under_switch && topo.function(id).kind == PortKind::SwitchUpstream {
            break;
        }
        out.push(id);
    }
    out
}

/// [`dot`] with devices marked as having moved data.
pub fn dot_marked(topo: &Topology, pair: Option<(FnId, FnId)>, marks: &[Mark]) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "digraph pcie {{");
    let _ = writeln!(out, "  label={};", q(topo.source()));
    let _ = writeln!(out, "  node [shape=box, style=filled, fontsize=10];");
    // The pair's path: each function on either side up to (and including) the common
    // bridge, or up to the host bridges when there is none.
    let (path, colour, crossing) = match pair {
        Some((a, b)) => {
            let v = calc_map_type_and_dist(topo, a, b);
            let (pa, pb) = (topo.upstream_path(a), topo.upstream_path(b));
            let common: BTreeSet<FnId> = pa.iter().copied().filter(|x| pb.contains(x)).collect();
            let mut on: BTreeSet<FnId> = BTreeSet::new();
            for side in [&pa, &pb] {
                for &id in side {
                    on.insert(id);
                    if common.contains(&id) {
                        break;
                    }
                }
            }
            // No common bridge: the path goes up through the host bridge(s).
            (on, Some(verdict_colour(v.map_type)), common.is_empty())
        }
        None => (BTreeSet::new(), None, false),
    };
    for (i, hb) in topo.host_bridges().iter().enumerate() {
        let mut label = format!("host bridge {}", hb.root);
        if let Some(f) = topo.host_bridge_function(i) {
            let _ = write!(label, "\n{:04x}:{:04x}", f.vendor, f.device);
        }
        let crossed = crossing
            && pair
                .is_some_and(|(a, b)| topo.host_bridge_of(a) == i || topo.host_bridge_of(b) == i);
        let _ = writeln!(
            out,
            "  hb{i} [label={}, fillcolor=lightgray{}];",
            q(&label),
            if crossed {
                format!(", color={}, penwidth=3", colour.unwrap_or("black"))
            } else {
                String::new()
            }
        );
    }
    for id in topo.ids() {
        let f = topo.function(id);
        if f.kind == PortKind::HostBridge {
            continue;
        }
        let short: String = f.name.chars().take(28).collect();
        let mut label = format!("{}\n{}\n{short}", f.bdf, kind_word(f.kind));
        let mark = marks.iter().find(|m| m.id == id);
        if let Some(m) = mark {
            let _ = write!(label, "\n{}", m.note);
        }
        let chosen = pair.is_some_and(|(a, b)| a == id || b == id);
        let border = match (chosen, mark) {
            (true, _) => Some(colour.unwrap_or("black")),
            (false, Some(m)) => Some(m.colour),
            _ => None,
        };
        let _ = writeln!(
            out,
            "  {} [label={}, fillcolor={}{}];",
            node(topo, id),
            q(&label),
            fill(topo, id),
            border.map_or(String::new(), |c| format!(", color={c}, penwidth=3"))
        );
    }
    for id in topo.ids() {
        let f = topo.function(id);
        if f.kind == PortKind::HostBridge {
            continue;
        }
        let parent = match topo.upstream_bridge(id) {
            Some(p) => node(topo, p),
            None => format!("hb{}", topo.host_bridge_of(id)),
        };
        let link = f.link.map(|l| format!("x{} {}", l.width, l.speed));
        let on_path = path.contains(&id)
            && match topo.upstream_bridge(id) {
                Some(p) => path.contains(&p),
                None => crossing,
            };
        let mut attrs = Vec::new();
        if let Some(l) = link {
            attrs.push(format!("label={}", q(&l)));
        }
        let marked = marks.iter().find(|m| mark_links(topo, m).contains(&id));
        if on_path {
            attrs.push(format!("color={}", colour.unwrap_or("black")));
            attrs.push("penwidth=3".into());
        } else if let Some(m) = marked {
            attrs.push(format!("color={}", m.colour));
            attrs.push("penwidth=3".into());
        }
        let attrs = if attrs.is_empty() {
            String::new()
        } else {
            format!(" [{}]", attrs.join(", "))
        };
        let _ = writeln!(out, "  {parent} -> {}{attrs};", node(topo, id));
    }
    let _ = writeln!(out, "}}");
    out
}

/// Lays `dot` out and draws it as SVG (layout-rs).
pub fn svg(dot: &str) -> Result<String> {
    let mut parser = layout::gv::DotParser::new(dot);
    let graph = parser
        .process()
        .map_err(|e| anyhow!("the generated DOT did not parse: {e}"))?;
    let mut builder = layout::gv::GraphBuilder::new();
    builder.visit_graph(&graph);
    let mut vg = builder.get();
    let mut writer = layout::backends::svg::SVGWriter::new();
    vg.do_it(false, false, false, &mut writer);
    Ok(writer.finalize())
}
