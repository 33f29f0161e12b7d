//! Reading a run's output: whether the programs loaded (and the verifier's
//! words when not), each suite's counts, failures and notes, and the table
//! `vm-test` prints.

use std::{
    fmt::Write as _,
    path::{Path, PathBuf},
    time::Duration,
};

use super::{run::Run, MARK, SUITES};

/// How the agent's loader (`Dataplane::load_with`, today in
/// proxy-agent/src/dataplane.rs) words a failed load: the object (maps, BTF) or
/// a program (followed by its name). Matched as text (here and by the init
/// script's grep), so a change of wording there must be made here too:
/// otherwise a rejected program is no longer recognised as one (no verifier
/// log under the table, and the suites run anyway).
pub(super) const OBJECT_FAILED: &str = "loading the eBPF object";
pub(super) const PROGRAM_REJECTED: &str = "the verifier rejected ";
pub(super) const LOAD_FAILURES: &[&str] = &[OBJECT_FAILED, PROGRAM_REJECTED];
/// Lines of the verifier log shown in the summary (the rejection is at its end).
pub(super) const VERIFIER_TAIL: usize = 16;

#[derive(Debug, PartialEq)]
pub(super) enum Programs {
    Loaded,
    /// `program` is `None` when the object itself failed (a map, BTF).
    Rejected {
        program: Option<String>,
        message: String,
    },
    /// No probe result: why.
    Unknown(String),
}

#[derive(Debug, PartialEq)]
pub(super) enum Tests {
    Counted {
        passed: u32,
        failed: u32,
        failures: Vec<String>,
    },
    Skipped,
    Unfinished(String),
}

pub(super) struct Outcome {
    pub(super) kernel: String,
    /// `host`, `KVM` or `TCG`.
    pub(super) how: &'static str,
    pub(super) programs: Programs,
    /// One per suite, in [`SUITES`] order.
    pub(super) suites: Vec<Tests>,
    /// What each suite said it worked around (its [`NOTES_ENV`] lines).
    pub(super) notes: Vec<Vec<String>>,
    pub(super) seconds: f64,
    pub(super) log: PathBuf,
}

impl Outcome {
    pub(super) fn from_run(
        kernel: String,
        how: &'static str,
        run: &Run,
        timeout: Duration,
        log: &Path,
    ) -> Self {
        let lines = &run.lines;
        let (programs, suites) = read_outcome(lines);
        let suites = suites
            .into_iter()
            .map(|tests| match tests {
                Tests::Unfinished(why) if run.timed_out && why != "did not start" => {
                    Tests::Unfinished(format!("timed out after {} s", timeout.as_secs()))
                }
                other => other,
            })
            .collect();
        let notes = SUITES.iter().map(|s| suite_notes(lines, s.mark)).collect();
        Self {
            kernel,
            how,
            programs,
            suites,
            notes,
            seconds: run.seconds,
            log: log.to_path_buf(),
        }
    }

    pub(super) fn passed(&self) -> bool {
        self.programs == Programs::Loaded
            && self.suites.iter().all(
                |tests| matches!(tests, Tests::Counted { passed, failed: 0, .. } if *passed > 0),
            )
    }
}

/// The text after [`MARK`] on each marked line.
pub(super) fn marks(lines: &[String]) -> impl Iterator<Item = &str> {
    lines
        .iter()
        .filter_map(|l| l.find(MARK).map(|i| &l[i + MARK.len()..]))
}

/// The lines between `begin <name>` and `end <name> ...`.
pub(super) fn section<'a>(lines: &'a [String], name: &str) -> &'a [String] {
    let begin = format!("{MARK}begin {name}");
    let end = format!("{MARK}end {name}");
    let Some(start) = lines.iter().position(|l| l.contains(&begin)) else {
        return &[];
    };
    let rest = &lines[start + 1..];
    let len = rest
        .iter()
        .position(|l| l.contains(&end))
        .unwrap_or(rest.len());
    &rest[..len]
}

pub(super) fn is_load_failure(line: &str) -> bool {
    LOAD_FAILURES.iter().any(|m| line.contains(m))
}

/// Programs and each suite's tests (in [`SUITES`] order) from a transcript with
/// the init script's marks.
pub(super) fn read_outcome(lines: &[String]) -> (Programs, Vec<Tests>) {
    let ended = |name: &str| {
        marks(lines)
            .filter_map(|m| m.strip_prefix(&format!("end {name} ")))
            .find_map(|code| code.trim().parse::<i32>().ok())
    };
    let probe = section(lines, "probe");
    let programs = match ended("probe") {
        None if marks(lines).any(|m| m == "begin probe") => {
            Programs::Unknown("probe unfinished".into())
        }
        None => Programs::Unknown("did not start".into()),
        Some(code) => match probe.iter().position(|l| is_load_failure(l)) {
            Some(at) if code != 0 => Programs::Rejected {
                program: probe[at].find(PROGRAM_REJECTED).and_then(|i| {
                    let name = probe[at][i + PROGRAM_REJECTED.len()..]
                        .split_whitespace()
                        .next()?;
                    Some(name.trim_end_matches(':').to_string())
                }),
                message: load_error(&probe[at..]),
            },
            _ => Programs::Loaded,
        },
    };
    let skipped = marks(lines).any(|m| m == "suites skipped");
    let tests = SUITES
        .iter()
        .map(|s| {
            if skipped {
                return Tests::Skipped;
            }
            let suite = section(lines, s.mark);
            match (ended(s.mark), suite.iter().rev().find_map(|l| counts(l))) {
                (Some(_), Some((passed, failed))) => Tests::Counted {
                    passed,
                    failed,
                    failures: failures(suite),
                },
                (Some(code), None) => Tests::Unfinished(format!("no test result (exit {code})")),
                (None, _) if marks(lines).any(|m| m == format!("begin {}", s.mark)) => {
                    Tests::Unfinished("stopped during the tests".into())
                }
                (None, _) => Tests::Unfinished("did not start".into()),
            }
        })
        .collect();
    (programs, tests)
}

/// The notes a suite left (`note <mark> <text>` marks), each once.
pub(super) fn suite_notes(lines: &[String], mark: &str) -> Vec<String> {
    let prefix = format!("note {mark} ");
    let mut out: Vec<String> = Vec::new();
    for note in marks(lines).filter_map(|m| m.strip_prefix(&prefix)) {
        if !out.iter().any(|n| n == note) {
            out.push(note.to_string());
        }
    }
    out
}

/// `N passed; M failed` from libtest's `test result:` line.
pub(super) fn counts(line: &str) -> Option<(u32, u32)> {
    let summary = &line[line.find("test result:")?..];
    let number_before = |word: &str| -> Option<u32> {
        let end = summary.find(word)?;
        summary[..end].split_whitespace().last()?.parse().ok()
    };
    Some((number_before(" passed")?, number_before(" failed")?))
}

/// The names libtest lists under its last `failures:` heading.
pub(super) fn failures(suite: &[String]) -> Vec<String> {
    let Some(start) = suite.iter().rposition(|l| l.trim_end() == "failures:") else {
        return Vec::new();
    };
    suite[start + 1..]
        .iter()
        .take_while(|l| !l.contains("test result:"))
        .filter_map(|l| l.strip_prefix("    "))
        .map(|l| l.trim().to_string())
        .filter(|l| !l.is_empty())
        .collect()
}

/// The load error from the probe's output, starting at the line that names it:
/// the error chain, with only the end of the verifier log (where the verifier
/// says why); the whole log is in the run's log file.
pub(super) fn load_error(from: &[String]) -> String {
    let end = from
        .iter()
        .position(|l| {
            l.starts_with("note: ")
                || l.starts_with("stack backtrace:")
                || l.starts_with("failures:")
                || l.starts_with("---- ")
        })
        .unwrap_or(from.len());
    let block = &from[..end];
    let mut out = String::new();
    let mut i = 0;
    while i < block.len() {
        let line = &block[i];
        if let Some(at) = line.find("Verifier output:") {
            let _ = writeln!(out, "{}", &line[..at + "Verifier output:".len()]);
            // The log runs on, indented, until the next cause or the end.
            let mut log = vec![line[at + "Verifier output:".len()..].trim().to_string()];
            i += 1;
            while i < block.len() && !is_cause(&block[i]) {
                log.push(block[i].trim().to_string());
                i += 1;
            }
            while log.last().is_some_and(String::is_empty) {
                log.pop();
            }
            if log.len() > VERIFIER_TAIL {
                let _ = writeln!(
                    out,
                    "       ... ({} lines of the log before these)",
                    log.len() - VERIFIER_TAIL
                );
            }
            for l in &log[log.len().saturating_sub(VERIFIER_TAIL)..] {
                let _ = writeln!(out, "       {l}");
            }
            continue;
        }
        if !line.trim().is_empty() {
            let _ = writeln!(out, "{line}");
        }
        i += 1;
    }
    out.trim_end().to_string()
}

/// anyhow's `Caused by:` entries: `    1: ...`.
pub(super) fn is_cause(line: &str) -> bool {
    let t = line.trim_start();
    line.len() - t.len() == 4
        && t.split_once(": ")
            .is_some_and(|(n, _)| n.parse::<u32>().is_ok())
}

pub(super) fn table(outcomes: &[Outcome], programs: &[String]) -> String {
    let rows: Vec<Vec<String>> = outcomes.iter().map(|o| row(o, programs)).collect();
    let header: Vec<String> = ["kernel", "programs"]
        .into_iter()
        .chain(SUITES.iter().map(|s| s.column))
        .chain(["time"])
        .map(String::from)
        .collect();
    let mut widths: Vec<usize> = header.iter().map(String::len).collect();
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    let mut out = String::new();
    for row in std::iter::once(header).chain(rows) {
        let last = row.len() - 1;
        let mut line = String::new();
        for (i, (cell, w)) in row.iter().zip(&widths).enumerate() {
            if i == last {
                line.push_str(cell);
            } else {
                let _ = write!(line, "{cell:<w$}  ");
            }
        }
        let _ = writeln!(out, "{}", line.trim_end());
    }
    for o in outcomes {
        explain(&mut out, o);
    }
    out
}

/// An outcome's row of the table: kernel, programs, one cell per suite, time.
fn row(o: &Outcome, programs: &[String]) -> Vec<String> {
    let programs = match &o.programs {
        Programs::Loaded if programs.is_empty() => "all loaded".into(),
        Programs::Loaded => format!("{} ok", programs.join(", ")),
        Programs::Rejected {
            program: Some(p), ..
        } => format!("{p} REJECTED"),
        Programs::Rejected { program: None, .. } => "object not loaded".into(),
        Programs::Unknown(why) => why.clone(),
    };
    let tests = o.suites.iter().zip(&o.notes).map(|(tests, notes)| {
        let mut cell = match tests {
            Tests::Counted { passed, failed, .. } => {
                format!("{passed} passed, {failed} failed")
            }
            Tests::Skipped => "not run".into(),
            Tests::Unfinished(why) => why.clone(),
        };
        if !notes.is_empty() {
            cell.push_str(" (kernel limitation, see below)");
        }
        cell
    });
    [o.kernel.clone(), programs]
        .into_iter()
        .chain(tests)
        .chain([format!("{:.0} s ({})", o.seconds, o.how)])
        .collect()
}

/// What the table cannot say about an outcome, under it: the load error,
/// an unfinished probe, notes, failed tests, where the log is.
fn explain(out: &mut String, o: &Outcome) {
    if let Programs::Rejected { message, .. } = &o.programs {
        let _ = write!(
            out,
            "\n{}: the programs did not load:\n{message}\n",
            o.kernel
        );
    }
    if o.programs == Programs::Unknown("probe unfinished".into()) {
        let _ = writeln!(
            out,
            "\n{}: the first test did not finish. A program the verifier works on for \
             minutes (a loop it cannot bound, say) looks like this; the run on this \
             machine's kernel shows the verifier's log sooner.",
            o.kernel
        );
    }
    for (suite, notes) in SUITES.iter().zip(&o.notes) {
        for note in notes {
            let _ = writeln!(
                out,
                "\n{}: {}: known kernel limitation, worked around: {note}",
                o.kernel, suite.column
            );
        }
    }
    for (suite, tests) in SUITES.iter().zip(&o.suites) {
        if let Tests::Counted { failures, .. } = tests {
            if !failures.is_empty() {
                let _ = writeln!(
                    out,
                    "\n{}: {} failed: {}",
                    o.kernel,
                    suite.column,
                    failures.join(", ")
                );
            }
        }
    }
    if !o.passed() {
        let _ = writeln!(out, "{}: full output in {}", o.kernel, o.log.display());
    }
}
