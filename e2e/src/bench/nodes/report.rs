//! Printing a run, and the summary table against the targets.

use super::*;

pub(super) fn print_cell(c: Contender, n: usize, round: &str, cell: &Cell) {
    let head = format!("  N={n:<5} {:<8} {round:<8}", c.key());
    match cell {
        Cell::Done(f) => {
            let rss = f.rss_mib.map(|m| format!(", peak RSS {m:.1} MiB")).unwrap_or_default();
            println!(
                "{head} {:>8.2} s to all done (Node creates returned after {:.2} s; contender start-up {:.1} s{rss})",
                f.secs, f.create_secs, f.startup_secs
            );
            let writes: u64 = f
                .writes
                .iter()
                .filter(|(k, _)| !k.starts_with("nodes POST") && !k.starts_with("events"))
                .map(|(_, v)| v)
                .sum();
            let tally: Vec<String> = f.writes.iter().map(|(k, v)| format!("{k}: {v}")).collect();
            println!(
                "{:16} API writes besides the Node creates: {writes} ({:.2} per Node) [{}]",
                "",
                writes as f64 / n as f64,
                tally.join(", ")
            );
            for note in &f.notes {
                println!("{:16} {note}", "");
            }
        }
        Cell::Timeout { done, limit } => println!("{head} timeout after {limit:?} ({done}/{n} Nodes done)"),
        Cell::Failed(e) => println!("{head} FAILED: {}", e.replace('\n', "\n                 ")),
        Cell::Skipped(why) => println!("{head} skipped: {why}"),
    }
}

pub(super) fn ratio(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => Some(a / b),
        _ => None,
    }
}

pub(super) fn fmt_opt(v: Option<f64>, digits: usize) -> String {
    v.map(|v| format!("{v:.digits$}")).unwrap_or_else(|| "-".into())
}

pub(super) fn verdict(ok: Option<bool>) -> &'static str {
    match ok {
        Some(true) => "ok",
        Some(false) => "MISSED",
        None => "n/a",
    }
}

type Results = BTreeMap<(usize, Contender), Vec<Cell>>;

/// The median over the finished runs of `c` at `n` of `figure`.
fn median_of(results: &Results, n: usize, c: Contender, figure: impl Fn(&Figures) -> Option<f64>) -> Option<f64> {
    let values: Vec<f64> = results
        .get(&(n, c))
        .into_iter()
        .flatten()
        .filter_map(|cell| match cell {
            Cell::Done(f) => figure(f),
            _ => None,
        })
        .collect();
    crate::bench::median(&values)
}

/// "finished/runs" when a run did not finish, else the median.
fn shown(results: &Results, n: usize, c: Contender, figure: impl Fn(&Figures) -> Option<f64>, digits: usize) -> String {
    let cells = results.get(&(n, c)).map(Vec::as_slice).unwrap_or_default();
    let done = cells.iter().filter(|c| matches!(c, Cell::Done(_))).count();
    match median_of(results, n, c, figure) {
        Some(v) if done == cells.len() => format!("{v:.digits$}"),
        Some(v) => format!("{v:.digits$} ({done}/{})", cells.len()),
        None => cells.first().map(Cell::short).unwrap_or_else(|| "-".into()),
    }
}

pub(super) fn print_table(sizes: &[usize], results: &Results) {
    use Contender::*;
    let secs = |n, c| median_of(results, n, c, |f| Some(f.secs));
    let cpu = |n, c| median_of(results, n, c, |f| f.apiserver_cpu);
    let rss = |n| median_of(results, n, Carve, |f| f.rss_mib);
    println!();
    println!("summary: medians over the runs (carve and raw: --repeat each, KCM: one run)");
    println!(
        "{:>6} {:>9} {:>9} {:>9} {:>9} {:>10} {:>10} {:>10} {:>9} {:>9} {:>9} {:>9} {:>8}",
        "nodes",
        "carve s",
        "KCM s",
        "KCM-qps s",
        "raw s",
        "carve/KCM",
        "c/KCM-qps",
        "raw/carve",
        "apiCPU c",
        "apiCPU r",
        "recon/N",
        "status/N",
        "RSS MiB"
    );
    for &n in sizes {
        let per_node = |v: Option<f64>| v.map(|v| v / n as f64);
        println!(
            "{n:>6} {:>9} {:>9} {:>9} {:>9} {:>10} {:>10} {:>10} {:>9} {:>9} {:>9} {:>9} {:>8}",
            shown(results, n, Carve, |f| Some(f.secs), 1),
            shown(results, n, Kcm, |f| Some(f.secs), 1),
            shown(results, n, KcmQps, |f| Some(f.secs), 1),
            shown(results, n, Raw, |f| Some(f.secs), 1),
            fmt_opt(ratio(secs(n, Carve), secs(n, Kcm)), 3),
            fmt_opt(ratio(secs(n, Carve), secs(n, KcmQps)), 3),
            fmt_opt(ratio(secs(n, Raw), secs(n, Carve)), 3),
            fmt_opt(cpu(n, Carve), 1),
            fmt_opt(cpu(n, Raw), 1),
            fmt_opt(per_node(median_of(results, n, Carve, |f| f.reconciles)), 2),
            fmt_opt(per_node(median_of(results, n, Carve, |f| Some(f.status_writes() as f64))), 2),
            fmt_opt(rss(n), 1),
        );
    }
    println!();
    println!("targets (from the issues), on the medians:");
    for &n in sizes {
        let vs_kcm = ratio(secs(n, Carve), secs(n, Kcm));
        let of_raw = ratio(secs(n, Raw), secs(n, Carve));
        let cpu_ratio = ratio(cpu(n, Carve), cpu(n, Raw));
        println!(
            "  N={n:<5} carve/KCM-default {:>6} (<= 0.5) {:<6}  carve at {:>6} of the raw write rate (>= 0.9) {:<6}  \
             kube-apiserver CPU carve/raw {:>6} (<= 1.15) {}",
            fmt_opt(vs_kcm, 3),
            verdict(vs_kcm.map(|r| r <= 0.5)),
            fmt_opt(of_raw, 3),
            verdict(of_raw.map(|r| r >= 0.9)),
            fmt_opt(cpu_ratio, 3),
            verdict(cpu_ratio.map(|r| r <= 1.15)),
        );
        let rss = rss(n);
        if n >= 5000 {
            println!(
                "  N={n:<5} carve peak RSS {:>6} MiB (<= 40 MiB at 5000 nodes) {}",
                fmt_opt(rss, 1),
                verdict(rss.map(|r| r <= 40.0))
            );
        } else {
            println!("  N={n:<5} carve peak RSS {:>6} MiB (the 40 MiB target is set at 5000 nodes)", fmt_opt(rss, 1));
        }
    }
}

/// Rough duration of a run at `n`, from the same contender's first finished run at a smaller N.
pub(super) fn estimate(c: Contender, n: usize, results: &Results) -> Option<Duration> {
    let (m, f) = results.iter().rev().filter(|((m, k), _)| *k == c && *m < n).find_map(|((m, _), cells)| {
        cells.iter().find_map(|cell| match cell {
            Cell::Done(f) => Some((*m, f)),
            _ => None,
        })
    })?;
    let scale = n as f64 / m as f64;
    Some(Duration::from_secs_f64((f.secs + f.startup_secs) * scale + 15.0))
}
