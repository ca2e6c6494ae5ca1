//! The standard `process_*` metrics, read at scrape time from the kernel
//! (`getrusage`, `getrlimit`, `/proc/self`) and rendered straight into the
//! scrape text.
//!
//! They are rendered here rather than recorded through the `metrics` crate
//! because its counters are integers, and CPU time in whole seconds makes
//! `rate(process_cpu_seconds_total[1m])` useless. A value the kernel does
//! not give is left out rather than reported as zero.

use std::fmt::Write as _;

use nix::sys::resource::{getrlimit, getrusage, Resource, UsageWho};
use nix::unistd::{sysconf, SysconfVar};

use super::{
    PROCESS_CPU_SECONDS_TOTAL, PROCESS_MAX_FDS, PROCESS_OPEN_FDS, PROCESS_RESIDENT_MEMORY_BYTES,
    PROCESS_START_TIME_SECONDS, PROCESS_THREADS, PROCESS_VIRTUAL_MEMORY_BYTES,
};

/// Appends the process metrics to a scrape.
pub(super) fn render(out: &mut String) {
    if let Ok(usage) = getrusage(UsageWho::RUSAGE_SELF) {
        let secs = |t: nix::sys::time::TimeVal| t.tv_sec() as f64 + t.tv_usec() as f64 / 1e6;
        let cpu = secs(usage.user_time()) + secs(usage.system_time());
        metric(
            out,
            PROCESS_CPU_SECONDS_TOTAL,
            "counter",
            "Total user and system CPU time spent in seconds.",
            cpu,
        );
    }
    if let Ok(fds) = std::fs::read_dir("/proc/self/fd") {
        metric(
            out,
            PROCESS_OPEN_FDS,
            "gauge",
            "Number of open file descriptors.",
            fds.count() as f64,
        );
    }
    if let Ok((soft, _)) = getrlimit(Resource::RLIMIT_NOFILE) {
        metric(
            out,
            PROCESS_MAX_FDS,
            "gauge",
            "Maximum number of open file descriptors.",
            soft as f64,
        );
    }
    if let Ok(text) = std::fs::read_to_string("/proc/self/status") {
        let status = Status::parse(&text);
        if let Some(kb) = status.rss_kb {
            metric(
                out,
                PROCESS_RESIDENT_MEMORY_BYTES,
                "gauge",
                "Resident memory size in bytes.",
                (kb * 1024) as f64,
            );
        }
        if let Some(kb) = status.vm_kb {
            metric(
                out,
                PROCESS_VIRTUAL_MEMORY_BYTES,
                "gauge",
                "Virtual memory size in bytes.",
                (kb * 1024) as f64,
            );
        }
        if let Some(n) = status.threads {
            metric(
                out,
                PROCESS_THREADS,
                "gauge",
                "Number of OS threads in the process.",
                n as f64,
            );
        }
    }
    if let Some(start) = start_time_seconds() {
        metric(
            out,
            PROCESS_START_TIME_SECONDS,
            "gauge",
            "Start time of the process since unix epoch in seconds.",
            start,
        );
    }
}

fn metric(out: &mut String, name: &str, kind: &str, help: &str, value: f64) {
    // Writing to a String cannot fail.
    let _ = write!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}\n\n");
}

fn start_time_seconds() -> Option<f64> {
    let ticks_per_second = sysconf(SysconfVar::CLK_TCK).ok().flatten()?;
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    let boot = std::fs::read_to_string("/proc/stat").ok()?;
    let since_boot = start_ticks(&stat)? as f64 / ticks_per_second as f64;
    Some(boot_time(&boot)? as f64 + since_boot)
}

/// What `/proc/self/status` says about memory and threads.
#[derive(Debug, Default, PartialEq, Eq)]
struct Status {
    rss_kb: Option<u64>,
    vm_kb: Option<u64>,
    threads: Option<u64>,
}

impl Status {
    fn parse(text: &str) -> Self {
        let mut s = Status::default();
        for line in text.lines() {
            let Some((key, value)) = line.split_once(':') else {
                continue;
            };
            let number = value.split_whitespace().next().and_then(|v| v.parse().ok());
            match key {
                "VmRSS" => s.rss_kb = number,
                "VmSize" => s.vm_kb = number,
                "Threads" => s.threads = number,
                _ => {}
            }
        }
        s
    }
}

/// Field 22 of `/proc/self/stat`: start time in clock ticks after boot.
/// Fields are counted after the command name, which may hold spaces and
/// parentheses, so parsing starts after its last `)`.
fn start_ticks(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    // Fields 3.. follow the name; field 22 is the 20th of them.
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// `btime` of `/proc/stat`: boot time in seconds since the epoch.
fn boot_time(stat: &str) -> Option<u64> {
    stat.lines()
        .find_map(|l| l.strip_prefix("btime "))
        .and_then(|v| v.trim().parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_fields_are_read_and_others_ignored() {
        let text = "Name:\tportcullis\nVmSize:\t  123456 kB\nVmRSS:\t    2048 kB\nThreads:\t7\nbogus\n";
        assert_eq!(
            Status::parse(text),
            Status {
                rss_kb: Some(2048),
                vm_kb: Some(123456),
                threads: Some(7)
            }
        );
        assert_eq!(Status::parse(""), Status::default());
    }

    #[test]
    fn start_ticks_survive_a_command_name_with_spaces_and_parentheses() {
        let stat = "4242 (we(ird) name) S 1 4242 4242 0 -1 4194560 100 0 0 0 5 3 0 0 20 0 3 0 987654 1000 200 18446744073709551615";
        assert_eq!(start_ticks(stat), Some(987654));
        assert_eq!(start_ticks("garbage"), None);
        assert_eq!(start_ticks("1 (x) S 1"), None);
    }

    #[test]
    fn boot_time_is_read_from_btime() {
        assert_eq!(
            boot_time("cpu 1 2 3\nbtime 1700000000\nprocesses 5\n"),
            Some(1_700_000_000)
        );
        assert_eq!(boot_time("cpu 1 2 3\n"), None);
    }

    #[test]
    fn the_rendered_text_has_help_type_and_a_value_for_each_metric() {
        let mut out = String::new();
        render(&mut out);
        for name in [
            PROCESS_CPU_SECONDS_TOTAL,
            PROCESS_OPEN_FDS,
            PROCESS_MAX_FDS,
            PROCESS_RESIDENT_MEMORY_BYTES,
            PROCESS_START_TIME_SECONDS,
            PROCESS_THREADS,
        ] {
            assert!(out.contains(&format!("# TYPE {name} ")), "{name} missing:\n{out}");
            let value: f64 = out
                .lines()
                .find_map(|l| l.strip_prefix(&format!("{name} ")))
                .unwrap()
                .parse()
                .unwrap();
            assert!(value > 0.0 || name == PROCESS_CPU_SECONDS_TOTAL, "{name} = {value}");
        }
    }
}
