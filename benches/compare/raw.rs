//! The `raw` section: the same gateway with the socket sensor and with the
//! raw sensor (`gateway.sensor = "raw"`, which needs CAP_NET_RAW), bulk TCP
//! throughput and UDP forwarding through each, repetition by repetition.
//! The raw sensor's kernel filter must keep proxied traffic out of
//! userspace, so the two should be within 5% of each other.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{bail, Result};

use super::load::{self, UdpSink};
use super::procs::{self, IperfServer, Portcullis};
use super::report::{fmt, Row, Series, Summary, Verdict, TARGETS};
use super::{note, Bench, DATAGRAM_LEN, KNOCKER, PORTCULLIS};

/// Columns of the series: socket sensor, raw sensor.
const SOCKET: usize = 0;
const RAW: usize = 1;
const SENSORS: [&str; 2] = ["socket", "raw"];

/// What the section measured.
#[derive(Default)]
pub struct RawResults {
    /// Gbit/s, one stream, per sensor.
    pub bulk: Series,
    /// Datagrams/s per sensor.
    pub udp: Series,
    /// Why the section did not run, when it did not.
    pub skipped: Option<String>,
}

impl Bench {
    /// Runs the section: two gateways on the same upstreams, one per sensor.
    pub(super) fn raw_sensor(&mut self) -> Result<()> {
        if !nix_is_root() {
            self.r.raw.skipped = Some("needs CAP_NET_RAW (run as root)".into());
            note("raw sensor: skipped, not root");
            return Ok(());
        }
        let sink = UdpSink::start()?;
        let iperf = match self.env.iperf3 {
            Some(_) => Some(IperfServer::start()?),
            None => None,
        };
        // One gateway at a time: a raw sensor's sockets see every packet
        // on the host (their filter drops it), so the socket sensor's run
        // must not have one beside it.
        let bulk_upstream = iperf.as_ref().map(|i| i.addr);
        for rep in 0..self.opts.reps {
            for (col, sensor) in SENSORS.into_iter().enumerate() {
                let gw = self.raw_gateway(sensor, bulk_upstream, sink.addr)?;
                if bulk_upstream.is_some() {
                    self.raw_bulk(rep, col, &gw);
                }
                self.raw_udp(rep, col, &gw, &sink);
            }
        }
        if iperf.is_none() {
            note("raw sensor: bulk skipped, iperf3 is not installed (scripts/bench installs it)");
        }
        Ok(())
    }

    /// A gateway with `sensor` in front of the bulk (when iperf3 is there)
    /// and UDP upstreams, its gates open for [`KNOCKER`].
    fn raw_gateway(&self, sensor: &str, bulk_upstream: Option<SocketAddr>, sink: SocketAddr) -> Result<Portcullis> {
        let (gw, seq) = self.start_gateway(&format!("raw-{sensor}"), &[], |seq| {
            let knock = format!(
                "knock = {{ sequence = [{}] }}",
                seq.iter()
                    .map(|s| format!("\"{}/udp\"", s.port()))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            let bulk = bulk_upstream.map_or(String::new(), |up| {
                format!(
                    "[service.bulk]\nlisten = \"127.0.0.1:0\"\nupstream = \"{up}\"\nunauthorized = \"refuse\"\nopen_for = \"1h\"\n{knock}\n"
                )
            });
            format!(
                "[gateway]\nsensor = \"{sensor}\"\n\n{bulk}\n\
                 [service.udp]\nlisten = \"127.0.0.1:0\"\nupstream = \"{sink}\"\nprotocol = \"udp\"\n\
                 unauthorized = \"refuse\"\nopen_for = \"1h\"\n{knock}\n"
            )
        })?;
        self.knock(&seq)?;
        gw.wait_grant("udp", &KNOCKER.to_string())?;
        if bulk_upstream.is_some() {
            gw.wait_grant("bulk", &KNOCKER.to_string())?;
        }
        Ok(gw)
    }

    fn raw_bulk(&mut self, rep: usize, col: usize, gw: &Portcullis) {
        let what = format!("bulk, 1 stream, {} sensor", SENSORS[col]);
        let run = || -> Result<f64> {
            let tr = procs::iperf_client(gw.service("bulk")?, 1, self.sizes.bulk)?;
            Ok(tr.gbit_per_s)
        };
        match run() {
            Ok(gbit) => {
                note(format!("{what}: {} Gbit/s", fmt(gbit)));
                self.r.raw.bulk.push(rep, col, gbit);
            }
            Err(e) => self.fail(&what, e),
        }
        std::thread::sleep(Duration::from_millis(100));
    }

    fn raw_udp(&mut self, rep: usize, col: usize, gw: &Portcullis, sink: &UdpSink) {
        let what = format!("udp forwarding, {} sensor", SENSORS[col]);
        let run = || -> Result<f64> {
            let target: SocketAddr = gw.service("udp")?;
            let before = sink.count();
            let (sent, elapsed) = load::udp_blast(target, DATAGRAM_LEN, self.sizes.udp_time, self.sizes.udp_max)?;
            std::thread::sleep(Duration::from_millis(200));
            let got = sink.count() - before;
            if got == 0 {
                bail!("none of {sent} datagrams arrived");
            }
            Ok(got as f64 / elapsed.as_secs_f64())
        };
        match run() {
            Ok(rate) => {
                note(format!("{what}: {} datagrams/s", fmt(rate)));
                self.r.raw.udp.push(rep, col, rate);
            }
            Err(e) => self.fail(&what, e),
        }
    }

    /// The section's rows: the raw sensor's value in the portcullis column,
    /// its ratio to the socket sensor's (same repetition) beside it.
    pub(super) fn raw_rows(&self) -> Vec<Row> {
        let r = &self.r.raw;
        let mut rows = Vec::new();
        if let Some(why) = &r.skipped {
            let mut cells: [String; TARGETS] = Default::default();
            cells[PORTCULLIS] = format!("skipped: {why}");
            rows.push(Row {
                what: "Raw sensor on vs off".into(),
                cells,
                relative: String::new(),
                target: "≥95% of socket sensor".into(),
                verdict: Verdict::Unjudged,
            });
            return rows;
        }
        for (what, s) in [
            ("Bulk throughput, 1 stream, raw sensor (Gbit/s)", &r.bulk),
            ("UDP forwarding, raw sensor (datagrams/s)", &r.udp),
        ] {
            let Some(raw) = s.summary(RAW) else { continue };
            let ratio = s.ratio(RAW, SOCKET);
            let mut cells: [String; TARGETS] = Default::default();
            cells[PORTCULLIS] = raw.show();
            rows.push(Row {
                what: what.into(),
                cells,
                relative: ratio
                    .map(|q: Summary| {
                        format!(
                            "{:.1}% of socket sensor ({})",
                            q.median * 100.0,
                            s.summary(SOCKET).map(|x| x.show()).unwrap_or_default()
                        )
                    })
                    .unwrap_or_default(),
                target: "≥95% of socket sensor".into(),
                verdict: Verdict::from(ratio.map(|q| q.median >= 0.95)),
            });
        }
        rows
    }
}

fn nix_is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:").map(|r| r.split_whitespace().nth(1) == Some("0")))
        })
        .unwrap_or(false)
}
