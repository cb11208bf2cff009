//! `peerdma run FILE --report FILE.html`: one self-contained HTML page per scenario run
//! — the verdict, the machine's PCIe tree with the devices that moved data and the links
//! their traffic crossed drawn on it, DMA bytes by path, a timeline of faults,
//! migrations, invalidations and evictions, and every step with its expectations. The
//! charts are drawn by plotters as inline SVG, the tree by layout-rs; nothing is fetched.

use std::fmt::Write as _;

use anyhow::{anyhow, Result};
use peerdma::dma::DmaStats;
use peerdma::fabric::Topology;
use peerdma::scenario::ScenarioReport;
use plotters::prelude::*;

use crate::topo::picture::{self, Mark};

/// Escapes text for HTML.
fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn bytes(n: u64) -> String {
    match n {
        n if n >= 1 << 30 => format!("{:.1} GiB", n as f64 / (1u64 << 30) as f64),
        n if n >= 1 << 20 => format!("{:.1} MiB", n as f64 / (1u64 << 20) as f64),
        n if n >= 1 << 10 => format!("{:.1} KiB", n as f64 / 1024.0),
        n => format!("{n} B"),
    }
}

/// The tree with each device that moved data marked: one mark per path its bytes took,
/// peer paths first, so the links under a switch take the peer colour and the links
/// above it the colour of the traffic that went on up.
fn tree(topo: &Topology, r: &ScenarioReport) -> Result<String> {
    let mut marks: Vec<Mark> = Vec::new();
    for d in &r.device_dma {
        let s = &d.stats;
        let Some(id) = d.bdf.as_deref().and_then(|b| topo.find(b).ok()) else {
            continue;
        };
        let paths = [
            (s.via_switch, "green", true, "via switch"),
            (s.same_device, "purple", true, "within"),
            (s.via_host_bridge, "orange", false, "via host bridge"),
            (s.host_ram, "blue", false, "RAM"),
        ];
        let used: Vec<String> = paths
            .iter()
            .filter(|p| p.0 > 0)
            .map(|p| format!("{} {}", bytes(p.0), p.3))
            .collect();
        if used.is_empty() {
            continue;
        }
        let note = format!("{}: {}", d.name, used.join(", "));
        for (n, colour, under_switch, _) in paths {
            if n > 0 {
                marks.push(Mark {
                    id,
                    colour,
                    note: note.clone(),
                    under_switch,
                });
            }
        }
    }
    picture::svg(&picture::dot_marked(topo, None, &marks))
}

fn chart_err<E: std::fmt::Debug>(e: E) -> anyhow::Error {
    anyhow!("drawing a chart: {e:?}")
}

/// DMA bytes by path, one bar each.
fn bytes_chart(s: &DmaStats) -> Result<String> {
    let bars = [
        // The tree's colours.
        ("switch", s.via_switch, RGBColor(0, 128, 0)),
        ("host bridge", s.via_host_bridge, RGBColor(255, 165, 0)),
        ("system RAM", s.host_ram, BLUE),
        ("within a device", s.same_device, RGBColor(128, 0, 128)),
    ];
    let max = bars.iter().map(|b| b.1).max().unwrap_or(0).max(1);
    let mut out = String::new();
    {
        let root = SVGBackend::with_string(&mut out, (720, 320)).into_drawing_area();
        root.fill(&WHITE).map_err(chart_err)?;
        let mut chart = ChartBuilder::on(&root)
            .caption("DMA bytes by path", ("sans-serif", 18))
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(80)
            .build_cartesian_2d((0..bars.len() - 1).into_segmented(), 0..max + max / 10)
            .map_err(chart_err)?;
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_label_formatter(&|v| match v {
                SegmentValue::CenterOf(i) => bars.get(*i).map_or("", |b| b.0).to_string(),
                _ => String::new(),
            })
            .y_label_formatter(&|v| bytes(*v))
            .draw()
            .map_err(chart_err)?;
        for (i, (_, v, colour)) in bars.iter().enumerate() {
            chart
                .draw_series(std::iter::once(Rectangle::new(
                    [
                        (SegmentValue::Exact(i), 0),
                        (SegmentValue::Exact(i + 1), *v),
                    ],
                    colour.mix(0.8).filled(),
                )))
                .map_err(chart_err)?;
        }
        root.present().map_err(chart_err)?;
    }
    Ok(out)
}

/// What each step adds to the timeline's four counts.
fn step_counts(op: &str, values: &std::collections::BTreeMap<String, u64>) -> [u64; 4] {
    let v = |k: &str| values.get(k).copied().unwrap_or(0);
    let faults = v("faults");
    let migrated = if op.contains("migrate") || op.contains("prefetch") {
        v("pages")
    } else {
        0
    };
    let invalidations = u64::from(matches!(op, "munmap" | "madvise" | "mprotect" | "remove"));
    let evicted = v("moved");
    [faults, migrated, invalidations, evicted]
}

/// Faults, migrated pages, invalidating operations and evicted pages, summed step by
/// step.
fn timeline_chart(r: &ScenarioReport) -> Result<String> {
    let mut sums = [0u64; 4];
    let mut series: [Vec<(usize, u64)>; 4] = Default::default();
    for (i, s) in r.steps.iter().enumerate() {
        let add = step_counts(&s.op, &s.values);
        for k in 0..4 {
            sums[k] += add[k];
            series[k].push((i + 1, sums[k]));
        }
    }
    let max = sums.iter().copied().max().unwrap_or(0).max(1);
    let n = r.steps.len().max(1);
    let names = [
        ("device faults", RED),
        ("pages migrated", BLUE),
        ("invalidating operations", RGBColor(255, 165, 0)),
        ("pages evicted", MAGENTA),
    ];
    let mut out = String::new();
    {
        let root = SVGBackend::with_string(&mut out, (720, 320)).into_drawing_area();
        root.fill(&WHITE).map_err(chart_err)?;
        let mut chart = ChartBuilder::on(&root)
            .caption("Timeline (running totals, by step)", ("sans-serif", 18))
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(60)
            .build_cartesian_2d(0..n, 0..max + max / 10)
            .map_err(chart_err)?;
        chart
            .configure_mesh()
            .x_desc("step")
            .draw()
            .map_err(chart_err)?;
        for (k, (name, colour)) in names.iter().enumerate() {
            let colour = *colour;
            chart
                .draw_series(LineSeries::new(series[k].clone(), colour.stroke_width(2)))
                .map_err(chart_err)?
                .label(*name)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], colour));
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .position(SeriesLabelPosition::UpperLeft)
            .draw()
            .map_err(chart_err)?;
        root.present().map_err(chart_err)?;
    }
    Ok(out)
}

/// The whole page.
pub fn scenario(topo: &Topology, r: &ScenarioReport) -> Result<String> {
    let mut h = String::new();
    let verdict = if r.passed { "passed" } else { "FAILED" };
    let _ = write!(
        h,
        "<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>{} — {verdict}</title>\n<style>\
         body{{font-family:sans-serif;margin:2em;max-width:1400px}}\
         table{{border-collapse:collapse;font-size:13px}}td,th{{border:1px solid #ccc;padding:2px 6px;text-align:left}}\
         tr.bad{{background:#fdd}}.ok{{color:#070}}.bad{{color:#b00}}code{{font-size:13px}}\
         .fig{{overflow:auto;border:1px solid #eee;margin:1em 0}}</style></head><body>\n",
        esc(&r.scenario)
    );
    let _ = writeln!(
        h,
        "<h1>{}</h1>\n<p>Machine <b>{}</b>, IOMMU {}. <b class=\"{}\">{verdict}</b>: {} checks held over {} steps.</p>",
        esc(&r.scenario),
        esc(&r.machine),
        if r.iommu { "on" } else { "off" },
        if r.passed { "ok" } else { "bad" },
        r.checks_passed,
        r.steps.len()
    );
    if let Some(m) = &r.mismatch {
        let _ = writeln!(
            h,
            "<p class=\"bad\">At {}:{}:{} <code>{}</code><br>expected: {}<br>got: {}</p>",
            esc(&m.file),
            m.line,
            m.col,
            esc(&m.step),
            esc(&m.expected),
            esc(&m.got)
        );
    }
    if let Some(l) = &r.leaks {
        let _ = writeln!(
            h,
            "<p class=\"bad\">Left held after every process exited:</p><pre>{}</pre>",
            esc(l)
        );
    }
    if !r.violations.is_empty() {
        let _ = writeln!(
            h,
            "<p class=\"bad\">DMA sanitizer:</p><pre>{}</pre>",
            esc(&r.violations.join("\n"))
        );
    }
    let _ = writeln!(
        h,
        "<h2>The machine, and where data moved</h2>\n<p>Each device that moved data is labelled with its bytes by path, and the links its traffic crossed are drawn in the path's colour: green peer-to-peer through a switch (up to the switch), purple within the device, orange peer-to-peer through the host bridge, blue to or from system RAM (up to the root complex).</p>\n<div class=\"fig\">{}</div>",
        tree(topo, r)?
    );
    let _ = writeln!(
        h,
        "<h2>DMA</h2>\n<div class=\"fig\">{}</div>",
        bytes_chart(&r.dma)?
    );
    if !r.device_dma.is_empty() {
        let _ = writeln!(h, "<table><tr><th>device</th><th>model</th><th>function</th><th>switch</th><th>host bridge</th><th>RAM</th><th>within</th><th>mappings</th></tr>");
        for d in &r.device_dma {
            let s = &d.stats;
            let _ = writeln!(
                h,
                "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                esc(&d.name),
                esc(&d.model),
                esc(d.bdf.as_deref().unwrap_or("")),
                bytes(s.via_switch),
                bytes(s.via_host_bridge),
                bytes(s.host_ram),
                bytes(s.same_device),
                s.mappings
            );
        }
        let _ = writeln!(h, "</table>");
    }
    let _ = writeln!(
        h,
        "<h2>Timeline</h2>\n<div class=\"fig\">{}</div>",
        timeline_chart(r)?
    );
    let _ = writeln!(h, "<h2>Steps and expectations</h2>\n<table><tr><th>line</th><th>group</th><th>step</th><th>result</th><th>checks</th><th>reports</th><th>µs</th></tr>");
    let failed_line = r.mismatch.as_ref().map(|m| m.line);
    for s in &r.steps {
        let bad = Some(s.line) == failed_line;
        let vals: Vec<String> = s.values.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let _ = writeln!(
            h,
            "<tr{}><td>{}</td><td>{}</td><td><code>{}</code></td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            if bad { " class=\"bad\"" } else { "" },
            s.line,
            esc(s.group.as_deref().unwrap_or("")),
            esc(&s.text),
            esc(&s.result),
            if bad {
                format!("{} (one failed)", s.checks)
            } else if s.checks > 0 {
                format!("{} held", s.checks)
            } else {
                String::new()
            },
            esc(&vals.join(" ")),
            s.micros
        );
    }
    let _ = writeln!(h, "</table>\n</body></html>");
    Ok(h)
}

/// A fuzz campaign's page: the figures, and each failing seed with its minimised
/// scenario and the command that replays it.
pub fn fuzz(c: &peerdma::scenario::fuzz::Campaign) -> String {
    let mut h = String::new();
    let verdict = if c.failures.is_empty() {
        "passed"
    } else {
        "FAILED"
    };
    let _ = write!(
        h,
        "<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>peerdma fuzz {}..{} — {verdict}</title>\n<style>\
         body{{font-family:sans-serif;margin:2em;max-width:1400px}}.ok{{color:#070}}.bad{{color:#b00}}\
         pre{{background:#f6f6f6;padding:1em;overflow:auto}}</style></head><body>\n",
        c.first_seed, c.end_seed
    );
    let _ = writeln!(
        h,
        "<h1>peerdma fuzz, seeds {}..{}</h1>\n<p><b class=\"{}\">{verdict}</b>: {} of {} seeds failed; {} scenario lines ({} operations drawn per seed) in {:.2} s, {:.0} lines/s with every check on.</p>",
        c.first_seed,
        c.end_seed,
        if c.failures.is_empty() { "ok" } else { "bad" },
        c.failures.len(),
        c.end_seed - c.first_seed,
        c.ops,
        c.ops_per_seed,
        c.seconds,
        c.ops_per_second
    );
    for f in &c.failures {
        let _ = writeln!(h, "<h2 class=\"bad\">seed {}</h2>", f.seed);
        if let Some(m) = &f.mismatch {
            let _ = writeln!(
                h,
                "<p>line {}: <code>{}</code><br>expected: {}<br>got: {}</p>",
                m.line,
                esc(&m.step),
                esc(&m.expected),
                esc(&m.got)
            );
        }
        if let Some(l) = &f.leaks {
            let _ = writeln!(h, "<p>left held:</p><pre>{}</pre>", esc(l));
        }
        let _ = writeln!(
            h,
            "<p>replay: <code>peerdma fuzz --seeds {} --ops {}</code>, or save the scenario below and <code>peerdma run</code> it.</p>",
            f.seed, c.ops_per_seed
        );
        if let Some(t) = &f.scenario {
            let _ = writeln!(h, "<pre>{}</pre>", esc(t));
        }
    }
    let _ = writeln!(h, "</body></html>");
    h
}
