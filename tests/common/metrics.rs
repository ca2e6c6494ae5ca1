//! Reading a Prometheus text scrape.

/// The sum of the samples of `name` whose labels include `labels`, in a
/// Prometheus text scrape; `None` when there is no such sample.
pub fn metric(scrape: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let mut sum = None;
    for line in scrape.lines().filter(|l| !l.starts_with('#')) {
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let (series_name, series_labels) = match series.split_once('{') {
            Some((n, rest)) => (n, rest.trim_end_matches('}')),
            None => (series, ""),
        };
        if series_name != name {
            continue;
        }
        let pairs: Vec<(&str, &str)> = series_labels
            .split(',')
            .filter_map(|p| p.split_once('='))
            .map(|(k, v)| (k.trim(), v.trim().trim_matches('"')))
            .collect();
        if labels.iter().all(|want| pairs.contains(want)) {
            *sum.get_or_insert(0.0) += value.parse::<f64>().expect("sample value");
        }
    }
    sum
}

/// How many connections of `service` the gateway decided as `decision`
/// (`portcullis_connections_total`), as it reports now.
pub fn decisions(gw: &super::Gateway, service: &str, decision: &str) -> f64 {
    metric(
        &gw.scrape(),
        "portcullis_connections_total",
        &[("service", service), ("decision", decision)],
    )
    .unwrap_or_else(|| panic!("no connections_total series for {service} {decision}"))
}
