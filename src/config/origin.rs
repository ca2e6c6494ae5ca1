//! Where a problem came from, said in its message: an environment override
//! names its variable (the file does not hold that value), and an unknown
//! key gets the known key it is closest to.

use std::collections::HashMap;

use super::{Problem, ENV_PREFIX, ENV_SEPARATOR};

/// One `PORTCULLIS__...` variable and the key path it sets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnvOverride {
    pub var: String,
    pub path: String,
}

/// The overrides in `env`, as the `config` crate reads them: the prefix
/// and `__` stripped, `__` between keys, matched in lowercase.
pub(super) fn env_overrides(env: &HashMap<String, String>) -> Vec<EnvOverride> {
    let prefix = format!("{ENV_PREFIX}{ENV_SEPARATOR}");
    let mut found: Vec<EnvOverride> = env
        .keys()
        .filter_map(|var| {
            let rest = var.strip_prefix(&prefix)?;
            Some(EnvOverride {
                var: var.clone(),
                path: rest.to_lowercase().replace(ENV_SEPARATOR, "."),
            })
        })
        .collect();
    found.sort_by(|a, b| a.var.cmp(&b.var));
    found
}

/// Adds to each problem the variable that set its key, or a key above it
/// (a table): `(set by PORTCULLIS__SERVICE__PG__OPEN_FOR)`.
pub(super) fn attribute(problems: &mut [Problem], overrides: &[EnvOverride]) {
    for p in problems {
        let by = overrides.iter().find(|o| {
            p.path == o.path
                || p.path
                    .strip_prefix(o.path.as_str())
                    .is_some_and(|rest| rest.starts_with(['.', '[']))
        });
        if let Some(o) = by {
            p.message = format!("{} (set by the environment variable {})", p.message, o.var);
        }
    }
}

/// serde's `deny_unknown_fields` message ("unknown field `open_fro`,
/// expected one of `listen`, `open_for`, ...") with the closest expected
/// key suggested, when one is close.
pub(super) fn suggest(message: &str) -> String {
    let Some(unknown) = message
        .strip_prefix("unknown field `")
        .and_then(|rest| rest.split('`').next())
    else {
        return message.to_owned();
    };
    // The `config` crate appends "for key `service.pg`": the key path says it.
    let message = message.split(" for key `").next().unwrap_or(message);
    let Some((_, expected)) = message.split_once("expected") else {
        return message.to_owned();
    };
    let candidates = expected.split('`').skip(1).step_by(2);
    match closest(unknown, candidates) {
        Some(key) => format!("unknown field `{unknown}`: did you mean `{key}`? (expected{expected})"),
        None => message.to_owned(),
    }
}

/// The candidate within a small edit distance of `word` (a typo, a swap,
/// a missing underscore), the closest first.
fn closest<'a>(word: &str, candidates: impl Iterator<Item = &'a str>) -> Option<&'a str> {
    let limit = (word.chars().count() / 3).clamp(1, 3);
    candidates
        .map(|c| (strsim::damerau_levenshtein(word, c), c))
        .filter(|(d, _)| *d <= limit)
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_close_key_is_suggested_and_a_far_one_is_not() {
        let msg = "unknown field `open_fro`, expected one of `listen`, `upstream`, `open_for` for key `service.pg`";
        assert_eq!(
            suggest(msg),
            "unknown field `open_fro`: did you mean `open_for`? (expected one of `listen`, `upstream`, `open_for`)"
        );
        let msg = "unknown field `openfor`, expected one of `listen`, `open_for`";
        assert!(suggest(msg).contains("did you mean `open_for`?"));
        let msg = "unknown field `bogus`, expected one of `listen`, `upstream`, `open_for`";
        assert_eq!(suggest(msg), msg);
        let msg = "unknown field `cont`, expected `count`";
        assert!(suggest(msg).contains("did you mean `count`?"));
        assert_eq!(suggest("invalid type: string"), "invalid type: string");
    }

    #[test]
    fn a_problem_at_or_under_an_overridden_key_names_the_variable() {
        let env = HashMap::from([
            ("PORTCULLIS__SERVICE__PG__OPEN_FOR".to_owned(), "abc".to_owned()),
            ("PORTCULLIS__SERVICE__PG__KNOCK".to_owned(), "x".to_owned()),
            ("HOME".to_owned(), "/root".to_owned()),
        ]);
        let overrides = env_overrides(&env);
        assert_eq!(overrides.len(), 2);
        let mut problems = vec![
            Problem {
                path: "service.pg.open_for".into(),
                message: "bad".into(),
            },
            Problem {
                path: "service.pg.knock.sequence[0]".into(),
                message: "bad".into(),
            },
            Problem {
                path: "service.pg.open_for_x".into(),
                message: "bad".into(),
            },
        ];
        attribute(&mut problems, &overrides);
        assert!(problems[0].message.contains("PORTCULLIS__SERVICE__PG__OPEN_FOR"));
        assert!(problems[1].message.contains("PORTCULLIS__SERVICE__PG__KNOCK"));
        assert_eq!(problems[2].message, "bad");
    }
}
