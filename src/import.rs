//! `portcullis import`: a knockd or fwknopd config into a `proxy.toml`.
//!
//! An importer reads the old daemon's files and builds a [`Doc`]: the
//! TOML to print, with a comment on every setting that has no equivalent
//! here or that `check` would refuse, and the key files the source holds.
//! Comments that need action start `# TODO KEY.PATH:` with the key path
//! `check` reports; the rest start `# NOTE`. Key material goes only into
//! key files (mode 0600, in the `-o` directory), never to stdout; the
//! printed config names each by path.
//!
//! Before printing, the import validates its own output exactly as `check`
//! does, and names any problem no comment named yet, so that what `check`
//! refuses is always explained in the file. The two importers own the
//! parsing ([`knockd`], [`fwknopd`]); this module owns the document, the
//! sequence advice they share, and writing the files.

pub mod fwknopd;
pub mod knockd;

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _};
use zeroize::Zeroizing;

use crate::config::{self, random_pass_chance, RANDOM_PASS_WARN};
use crate::step::{Proto, StepSpec};

/// Columns comments are wrapped at.
const WIDTH: usize = 78;

/// A TOML document being built: a header, then tables of settings, each
/// with its comments.
#[derive(Debug, Default)]
pub struct Doc {
    /// Comment lines at the top (without `# `).
    pub header: Vec<String>,
    pub tables: Vec<Table>,
    /// Key files to write: file name in the output directory, and text.
    pub keys: Vec<KeyOut>,
}

/// One `[name]` table.
#[derive(Debug, Default)]
pub struct Table {
    pub name: String,
    pub comments: Vec<String>,
    pub entries: Vec<Entry>,
}

/// `key = value`, with the comments above it; `commented_out` makes it a
/// suggestion to uncomment.
#[derive(Debug)]
pub struct Entry {
    pub comments: Vec<String>,
    pub key: String,
    pub value: String,
    pub commented_out: bool,
}

/// A key file the import writes.
pub struct KeyOut {
    pub file: String,
    pub text: Zeroizing<String>,
}

impl std::fmt::Debug for KeyOut {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyOut")
            .field("file", &self.file)
            .finish_non_exhaustive()
    }
}

/// A comment that asks for a change: `check` reports `path`.
pub fn todo(path: &str, text: &str) -> String {
    format!("TODO {path}: {text}")
}

/// A comment that informs: nothing to change for `check`.
pub fn note(text: &str) -> String {
    format!("NOTE {text}")
}

impl Table {
    pub fn new(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            ..Self::default()
        }
    }

    /// Adds `key = value` (`value` is TOML text: see [`quote`]).
    pub fn set(&mut self, key: &str, value: impl Into<String>, comments: Vec<String>) {
        self.entries.push(Entry {
            comments,
            key: key.to_string(),
            value: value.into(),
            commented_out: false,
        });
    }

    /// Adds `# key = value`: a suggestion to uncomment.
    pub fn suggest(&mut self, key: &str, value: impl Into<String>, comments: Vec<String>) {
        self.entries.push(Entry {
            comments,
            key: key.to_string(),
            value: value.into(),
            commented_out: true,
        });
    }
}

impl Doc {
    /// A document whose header says it came from `daemon`'s `file`.
    pub fn new(daemon: &str, file: &Path) -> Self {
        Self {
            header: vec![
                format!(
                    "Imported from {daemon}'s {} by `portcullis import {daemon}`.",
                    file.display()
                ),
                "Read every TODO (it names the key `portcullis check` reports) and NOTE,".to_string(),
                "then: portcullis check -c THIS_FILE".to_string(),
                note(&format!(
                    "{daemon}'s firewall most likely dropped what sources without a grant sent to a guarded \
                     port; here unauthorized = \"closed\" (the default) resets it as an unused port would, \
                     and \"dark\" drops it (needs CAP_NET_ADMIN): README, What a scanner sees"
                )),
            ],
            ..Self::default()
        }
    }

    pub fn table(&mut self, name: &str) -> &mut Table {
        let i = match self.tables.iter().position(|t| t.name == name) {
            Some(i) => i,
            None => {
                self.tables.push(Table::new(name));
                self.tables.len() - 1
            }
        };
        &mut self.tables[i]
    }

    /// Every key path a `TODO` comment names.
    pub fn todo_paths(&self) -> Vec<String> {
        let all = self.header.iter().chain(
            self.tables
                .iter()
                .flat_map(|t| t.comments.iter().chain(t.entries.iter().flat_map(|e| &e.comments))),
        );
        all.filter_map(|c| c.strip_prefix("TODO ")?.split_once(": ").map(|(p, _)| p.to_string()))
            .collect()
    }

    /// The TOML text.
    pub fn render(&self) -> String {
        let mut out = String::new();
        for c in &self.header {
            comment(&mut out, c);
        }
        for t in &self.tables {
            out.push('\n');
            for c in &t.comments {
                comment(&mut out, c);
            }
            let _ = writeln!(out, "[{}]", t.name);
            for e in &t.entries {
                for c in &e.comments {
                    comment(&mut out, c);
                }
                let hash = if e.commented_out { "# " } else { "" };
                let _ = writeln!(out, "{hash}{} = {}", e.key, e.value);
            }
        }
        out
    }
}

/// Writes `text` as `# ` lines wrapped at [`WIDTH`]; continuations are
/// indented so a `TODO`/`NOTE` starts only the first line.
fn comment(out: &mut String, text: &str) {
    let mut line = String::from("#");
    for word in text.split(' ') {
        if line.len() + 1 + word.len() > WIDTH && line.len() > 4 {
            out.push_str(&line);
            out.push('\n');
            line = String::from("#  ");
        }
        line.push(' ');
        line.push_str(word);
    }
    out.push_str(&line);
    out.push('\n');
}

/// Where an imported service's upstream goes: the old daemon let packets
/// through to the service on its own port, which portcullis now takes
/// (a wildcard bind conflicts with the service's, even on loopback), so
/// the service moves: ssh to the customary 2222, others 10000 up.
pub fn upstream_port(port: u16) -> u16 {
    match port {
        22 => 2222,
        p => p.checked_add(10000).unwrap_or_else(|| p - 10000),
    }
}

/// The `upstream` entry of an imported service on `port`, with its TODO.
pub fn set_upstream(t: &mut Table, base: &str, port: u16) {
    let moved = upstream_port(port);
    let how = if port == 22 {
        format!("sshd_config: `ListenAddress 127.0.0.1:{moved}`")
    } else {
        format!("bind it to 127.0.0.1:{moved}")
    };
    t.set(
        "upstream",
        quote(&format!("127.0.0.1:{moved}")),
        vec![todo(
            &format!("{base}.upstream"),
            &format!(
                "portcullis takes 0.0.0.0:{port}, where the service listened, so the service must move \
                 here ({how}), or upstream must name where it listens instead"
            ),
        )],
    );
}

/// Whether a comment on `named` speaks for a problem at `path` (the key
/// itself or one inside it).
fn covers(named: &str, path: &str) -> bool {
    path.strip_prefix(named)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('.') || rest.starts_with('['))
}

/// A TOML string literal.
pub fn quote(s: &str) -> String {
    toml::Value::String(s.to_string()).to_string()
}

/// A TOML array of string literals.
pub fn list(items: &[String]) -> String {
    let quoted: Vec<String> = items.iter().map(|s| quote(s)).collect();
    format!("[{}]", quoted.join(", "))
}

/// A setting or line of the source file, for comments: `FILE:LINE`.
pub fn at(file: &Path, line: usize) -> String {
    format!("{}:{line}", file.display())
}

/// A name usable as `[service.NAME]` or `[user.NAME]`: lowercase letters,
/// digits, `-` and `_` (environment overrides match keys in lowercase).
pub fn table_name(raw: &str, fallback: &str, taken: &[String]) -> String {
    let mut name: String = raw
        .trim()
        .chars()
        .map(|c| {
            let c = c.to_ascii_lowercase();
            if c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_' {
                c
            } else {
                '-'
            }
        })
        .collect();
    if name.trim_matches('-').is_empty() {
        name = fallback.to_string();
    }
    let base = name.clone();
    let mut n = 2;
    while taken.contains(&name) {
        name = format!("{base}-{n}");
        n += 1;
    }
    name
}

/// What to say about a knock sequence, and what to suggest instead.
#[derive(Debug, Clone, PartialEq)]
pub struct SequenceAdvice {
    /// The chance one random-order scan of the sequence (with no trap
    /// ports, as imported) opens the service.
    pub chance: f64,
    /// A sequence `check` accepts without a warning: the same ports where
    /// they pass (reordered if they ascend or descend, with steps added if
    /// too few are distinct) and trap ports around them.
    pub sequence: Vec<StepSpec>,
    pub traps: Vec<StepSpec>,
    /// The suggestion's chance.
    pub suggested_chance: f64,
    /// Whether the suggestion changes the steps (clients must follow).
    pub steps_changed: bool,
}

/// Advice on `seq`, avoiding `taken` ports (guarded ports, other steps).
pub fn advise(seq: &[StepSpec], taken: &[(Proto, u16)]) -> SequenceAdvice {
    let mut distinct: Vec<StepSpec> = Vec::new();
    for s in seq {
        if !distinct.contains(s) {
            distinct.push(*s);
        }
    }
    let chance = random_pass_chance(distinct.len(), 0, true);
    let proto = seq.first().map_or(Proto::Udp, |s| s.proto);
    let mut steps = distinct.clone();
    let in_use = |steps: &[StepSpec], p: Proto, port: u16| {
        steps.iter().any(|s| s.proto == p && s.port == port) || taken.contains(&(p, port))
    };
    // Too few distinct steps: add ports near the last.
    let mut next = steps.iter().map(|s| s.port).max().unwrap_or(7000);
    while steps.len() < 3 {
        next = if next > 65000 { 7000 } else { next.saturating_add(113) };
        if !in_use(&steps, proto, next) {
            steps.push(StepSpec {
                proto,
                ip: None,
                port: next,
            });
        }
    }
    let ports: Vec<u16> = steps.iter().map(|s| s.port).collect();
    let ascending = ports.windows(2).all(|w| w[0] <= w[1]);
    let descending = ports.windows(2).all(|w| w[0] >= w[1]);
    if ascending || descending {
        // As `check` suggests: sorted, the second and third swapped.
        steps.sort_by_key(|s| s.port);
        steps.swap(1, 2);
    }
    let steps_changed = steps != seq;
    let needed = (0..)
        .find(|t| random_pass_chance(steps.len(), *t, true) <= RANDOM_PASS_WARN)
        .unwrap_or(0);
    let mut traps: Vec<StepSpec> = Vec::new();
    // Around the steps, nearest first, so a scan of the neighbourhood
    // meets traps as often as steps.
    'outer: for d in 1..=2000u16 {
        for s in &steps {
            for port in [s.port.checked_add(d), s.port.checked_sub(d)].into_iter().flatten() {
                if traps.len() >= needed {
                    break 'outer;
                }
                if port == 0
                    || in_use(&steps, s.proto, port)
                    || traps.iter().any(|t| t.proto == s.proto && t.port == port)
                {
                    continue;
                }
                traps.push(StepSpec {
                    proto: s.proto,
                    ip: None,
                    port,
                });
            }
        }
    }
    SequenceAdvice {
        chance,
        suggested_chance: random_pass_chance(steps.len(), traps.len(), true),
        sequence: steps,
        traps,
        steps_changed,
    }
}

/// `1 in N` for a chance.
pub fn one_in(chance: f64) -> String {
    format!("1 in {:.0}", 1.0 / chance)
}

/// The suggested `knock = {...}` value.
pub fn knock_value(seq: &[StepSpec], traps: &[StepSpec], step_timeout: &str, sequence_timeout: &str) -> String {
    let steps: Vec<String> = seq.iter().map(ToString::to_string).collect();
    let mut v = format!("{{ sequence = {}", list(&steps));
    if !traps.is_empty() {
        let traps: Vec<String> = traps.iter().map(ToString::to_string).collect();
        let _ = write!(v, ", trap_ports = {}", list(&traps));
    }
    let _ = write!(
        v,
        ", step_timeout = {}, sequence_timeout = {} }}",
        quote(step_timeout),
        quote(sequence_timeout)
    );
    v
}

/// Where the import puts its outputs.
#[derive(Debug, Clone)]
pub struct Output {
    /// Directory for key files; created if missing.
    pub dir: Option<PathBuf>,
    /// Replace key files that exist.
    pub force: bool,
}

impl Output {
    /// Where the key file `name` goes, absolute, so the printed config
    /// works wherever it is saved.
    pub fn key_path(&self, name: &str) -> anyhow::Result<PathBuf> {
        let Some(dir) = &self.dir else {
            bail!("the source holds keys, which are never printed: give -o DIR to write key files (mode 0600) there");
        };
        let dir = std::path::absolute(dir).with_context(|| format!("cannot resolve {}", dir.display()))?;
        Ok(dir.join(name))
    }
}

/// Runs `portcullis import`: the text to print on stdout.
pub fn run(cmd: crate::cli::ImportCommand) -> anyhow::Result<String> {
    use crate::cli::ImportCommand;
    let (args, knockd) = match cmd {
        ImportCommand::Knockd(a) => (a, true),
        ImportCommand::Fwknopd(a) => (a, false),
    };
    let out = Output {
        dir: args.output.clone(),
        force: args.force,
    };
    let doc = if knockd {
        let text =
            std::fs::read_to_string(&args.path).with_context(|| format!("cannot read {}", args.path.display()))?;
        knockd::import(&args.path, &text)
    } else {
        fwknopd::import_path(&args.path, &out)?
    };
    finish(doc, &out)
}

/// Writes `doc`'s key files, validates the config as `check` would, names
/// any problem no comment names, and returns the text to print.
pub fn finish(mut doc: Doc, out: &Output) -> anyhow::Result<String> {
    if !doc.keys.is_empty() {
        let dir = out.key_path("")?;
        std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
        for k in &doc.keys {
            let path = dir.join(&k.file);
            if path.exists() && !out.force {
                bail!("{} exists: not overwritten (--force replaces it)", path.display());
            }
        }
        for k in &doc.keys {
            crate::client::command::write_private(&dir.join(&k.file), k.text.as_bytes(), out.force)?;
        }
    }
    let text = doc.render();
    let base = out.dir.clone().unwrap_or_default();
    let problems = match config::load_str(&text, "the imported config", HashMap::new())
        .and_then(|raw| config::validate_in(&raw, &base))
    {
        Ok(_) => Vec::new(),
        Err(e) => e.problems,
    };
    let named = doc.todo_paths();
    let unnamed: Vec<_> = problems
        .iter()
        .filter(|p| !named.iter().any(|n| covers(n, &p.path)))
        .collect();
    if !unnamed.is_empty() {
        let mut notes = vec![String::new(), "`portcullis check` also says:".to_string()];
        notes.extend(unnamed.iter().map(|p| todo(&p.path, &p.message)));
        doc.header.extend(notes);
    }
    let todos = doc.todo_paths().len();
    let services = doc.tables.iter().filter(|t| t.name.starts_with("service.")).count();
    eprintln!(
        "imported {services} service(s); {todos} TODO comment(s) to read; {} key file(s) written",
        doc.keys.len()
    );
    Ok(doc.render())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn steps(list: &[(u16, Proto)]) -> Vec<StepSpec> {
        list.iter()
            .map(|(port, proto)| StepSpec {
                proto: *proto,
                ip: None,
                port: *port,
            })
            .collect()
    }

    #[test]
    fn an_ascending_sequence_is_reordered_and_given_traps_below_the_warning() {
        let seq = steps(&[(7000, Proto::Tcp), (8000, Proto::Tcp), (9000, Proto::Tcp)]);
        let a = advise(&seq, &[(Proto::Tcp, 22)]);
        assert_eq!(a.chance, 1.0 / 6.0);
        let ports: Vec<u16> = a.sequence.iter().map(|s| s.port).collect();
        assert_eq!(ports, [7000, 9000, 8000]);
        assert!(a.steps_changed);
        assert_eq!(a.traps.len(), 20);
        assert!(a.suggested_chance <= RANDOM_PASS_WARN);
        assert!(a.traps.iter().all(|t| !a.sequence.contains(t) && t.proto == Proto::Tcp));
    }

    #[test]
    fn a_good_order_is_kept_and_only_traps_added() {
        let seq = steps(&[
            (12345, Proto::Tcp),
            (54321, Proto::Tcp),
            (24680, Proto::Tcp),
            (13579, Proto::Tcp),
        ]);
        let a = advise(&seq, &[]);
        assert!(!a.steps_changed);
        assert_eq!(a.traps.len(), 8);
        assert_eq!(one_in(a.suggested_chance), "1 in 11880");
    }

    #[test]
    fn too_few_distinct_steps_get_more() {
        let seq = steps(&[(1000, Proto::Udp), (2000, Proto::Udp), (1000, Proto::Udp)]);
        let a = advise(&seq, &[]);
        assert_eq!(a.sequence.len(), 3);
        let ports: Vec<u16> = a.sequence.iter().map(|s| s.port).collect();
        assert!(!ports.windows(2).all(|w| w[0] <= w[1]), "{ports:?}");
    }

    #[test]
    fn problems_no_comment_names_are_named_at_the_top() {
        let mut doc = Doc::new("knockd", Path::new("knockd.conf"));
        let t = doc.table("service.a");
        t.set("listen", quote("0.0.0.0:22"), vec![todo("service.a.listen", "a guess")]);
        t.set("upstream", quote("nowhere"), Vec::new());
        let out = Output {
            dir: None,
            force: false,
        };
        let text = finish(doc, &out).unwrap();
        assert!(
            text.contains("# TODO service.a.upstream: \"nowhere\" is not HOST:PORT"),
            "{text}"
        );
        assert!(text.contains("# TODO service.a: no way in"), "{text}");
        assert!(
            !text.contains("# TODO service.a.listen: 0.0.0.0"),
            "named already: {text}"
        );
    }

    #[test]
    fn comments_wrap_and_todo_paths_are_found() {
        let mut doc = Doc::default();
        doc.header.push(todo("service.a.knock.sequence", &"word ".repeat(40)));
        let t = doc.table("service.a");
        t.set("listen", quote("0.0.0.0:22"), vec![todo("service.a.upstream", "where")]);
        let text = doc.render();
        assert!(text.lines().all(|l| l.len() <= WIDTH + 6), "{text}");
        assert_eq!(doc.todo_paths(), ["service.a.knock.sequence", "service.a.upstream"]);
        assert_eq!(table_name("openSSH", "x", &[]), "openssh");
        assert_eq!(table_name("open SSH!", "x", &["open-ssh-".into()]), "open-ssh--2");
    }
}
