//! Unit tests of vm-test's pure parts: apt sources, cargo's messages, module
//! dependencies, ldd output, the console and the outcome table.

use std::{
    collections::HashMap,
    fmt::Write as _,
    path::{Path, PathBuf},
};

use super::{initramfs::*, kernels::*, modules::*, report::*, run::*, *};

fn lines(text: &str) -> Vec<String> {
    text.lines().map(String::from).collect()
}

#[test]
fn deb822_release_stanza_moves_to_the_suite() {
    let machine = "Types: deb\nURIs: http://mirror.example/debian\nSuites: bookworm bookworm-updates\n\
                       Components: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n\n\
                       Types: deb\nURIs: http://mirror.example/debian-security\nSuites: bookworm-security\n\
                       Components: main\n";
    let (out, name) = private_sources(machine, "bullseye").unwrap();
    assert_eq!(name, "ferry-vm-test.sources");
    assert_eq!(
        out,
        "Types: deb\nURIs: http://mirror.example/debian\nSuites: bullseye\nComponents: main\n\
             Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n\n"
    );
}

#[test]
fn one_line_release_entries_move_to_the_suite() {
    let machine = "deb [arch=amd64] http://mirror.example/debian bookworm main\n\
                       deb http://mirror.example/debian-security bookworm-security main\n\
                       # deb http://other bookworm main\n";
    let (out, name) = private_sources(machine, "bullseye").unwrap();
    assert_eq!(name, "ferry-vm-test.list");
    assert_eq!(
        out,
        "deb [arch=amd64] http://mirror.example/debian bullseye main\n"
    );
    assert!(private_sources("deb http://x bookworm-security main\n", "bullseye").is_none());
}

#[test]
fn metapackage_names_the_kernel() {
    let show = "Package: linux-image-cloud-amd64\nDepends: linux-image-5.10.0-32-cloud-amd64 (= 5.10.223-1)\n";
    assert_eq!(
        depends_on(show, "linux-image-5.10.0-").as_deref(),
        Some("linux-image-5.10.0-32-cloud-amd64")
    );
    assert_eq!(depends_on(show, "linux-image-6.1.0-"), None);
}

#[test]
fn cargo_message_names_the_test_executable() {
    let messages = r#"{"reason":"compiler-artifact","target":{"kind":["bin"],"name":"proxy-agent"},"executable":"/t/debug/proxy-agent"}
{"reason":"compiler-artifact","target":{"kind":["test"],"crate_types":["bin"],"name":"privileged_packets"},"executable":"/t/debug/deps/privileged_packets-0123"}
{"reason":"build-finished","success":true}"#;
    assert_eq!(
        executable_of(messages, "privileged_packets").as_deref(),
        Some("/t/debug/deps/privileged_packets-0123")
    );
}

/// A minimal ELF64 with a `.modinfo` section holding `info`.
fn module_elf(info: &[u8]) -> Vec<u8> {
    let names = b"\0.modinfo\0.shstrtab\0";
    let mut elf = vec![0u8; 64];
    elf[..6].copy_from_slice(b"\x7fELF\x02\x01");
    let info_at = elf.len();
    elf.extend_from_slice(info);
    let names_at = elf.len();
    elf.extend_from_slice(names);
    let shoff = elf.len();
    let header = |name: u32, offset: usize, size: usize| {
        let mut h = vec![0u8; 64];
        h[..4].copy_from_slice(&name.to_le_bytes());
        h[0x18..0x20].copy_from_slice(&(offset as u64).to_le_bytes());
        h[0x20..0x28].copy_from_slice(&(size as u64).to_le_bytes());
        h
    };
    elf.extend(header(0, 0, 0));
    elf.extend(header(1, info_at, info.len()));
    elf.extend(header(10, names_at, names.len()));
    elf[0x28..0x30].copy_from_slice(&(shoff as u64).to_le_bytes());
    elf[0x3a..0x3c].copy_from_slice(&64u16.to_le_bytes());
    elf[0x3c..0x3e].copy_from_slice(&3u16.to_le_bytes());
    elf[0x3e..0x40].copy_from_slice(&2u16.to_le_bytes());
    elf
}

#[test]
fn modinfo_gives_the_dependencies() {
    let elf = module_elf(b"license=GPL\0depends=a_b,c\0intree=Y\0");
    assert_eq!(modinfo_depends(&elf).unwrap(), ["a_b", "c"]);
    let none = module_elf(b"depends=\0name=veth\0");
    assert_eq!(modinfo_depends(&none).unwrap(), Vec::<String>::new());
    assert!(modinfo_depends(b"not an elf").is_none());
    assert_eq!(module_name("kernel/net/a/b-c.ko.xz"), "b-c");
}

#[test]
fn dependencies_load_first_and_once() {
    let deps: HashMap<&str, Vec<String>> = [
        ("veth", vec!["a-b".to_string(), "c".to_string()]),
        ("a_b", vec!["c".to_string()]),
        ("c", vec![]),
    ]
    .into_iter()
    .collect();
    let order = load_order("veth", &mut |name| {
        let needs = deps.get(module_key(name).as_str()).context("none")?;
        Ok((name.as_bytes().to_vec(), needs.clone()))
    })
    .unwrap();
    let names: Vec<&str> = order.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["c", "a-b", "veth"]);
    assert_eq!(order[2].1, b"veth");
}

#[test]
fn table_has_a_column_per_suite() {
    let outcome = Outcome {
        kernel: "6.1.0-50-cloud-amd64".into(),
        how: "KVM",
        programs: Programs::Loaded,
        suites: vec![
            Tests::Counted {
                passed: 35,
                failed: 0,
                failures: Vec::new(),
            },
            Tests::Counted {
                passed: 10,
                failed: 1,
                failures: vec!["t".into()],
            },
            Tests::Counted {
                passed: 6,
                failed: 0,
                failures: Vec::new(),
            },
        ],
        notes: vec![Vec::new(), Vec::new(), Vec::new()],
        seconds: 12.0,
        log: PathBuf::from("/l"),
    };
    assert!(!outcome.passed());
    let text = table(&[outcome], &[]);
    let mut rows = text.lines();
    assert_eq!(
        rows.next().unwrap(),
        "kernel                programs    packet tests         uplink tests         socket tests        time"
    );
    assert_eq!(
        rows.next().unwrap(),
        "6.1.0-50-cloud-amd64  all loaded  35 passed, 0 failed  10 passed, 1 failed  6 passed, 0 failed  12 s (KVM)"
    );
    assert!(text.contains("uplink tests failed: t"), "{text}");
}

#[test]
fn ldd_output_gives_libraries_and_loader() {
    let ldd = "\tlinux-vdso.so.1 (0x00007ffd)\n\tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f)\n\
                   \t/lib64/ld-linux-x86-64.so.2 (0x00007f)\n";
    assert_eq!(
        libraries(ldd),
        [
            "/lib/x86_64-linux-gnu/libc.so.6",
            "/lib64/ld-linux-x86-64.so.2"
        ]
    );
    assert!(libraries("\tnot a dynamic executable\n").is_empty());
}

#[test]
fn console_noise_is_removed() {
    assert_eq!(
        clean(b"\x1bc\x1b[?7l\x1b[2JFERRY-VM: done\r"),
        "FERRY-VM: done"
    );
}

const PASSING: &str = "\
FERRY-VM: kernel 5.10.0-32-cloud-amd64
FERRY-VM: begin probe

running 1 test
test arp_is_untouched ... ok

test result: ok. 1 passed; 0 failed; 0 ignored; 0 measured; 33 filtered out; finished in 0.5s
FERRY-VM: end probe 0
FERRY-VM: begin packets
running 34 tests
test result: FAILED. 33 passed; 1 failed; 0 ignored; 0 measured; 0 filtered out; finished in 30s

failures:

---- a stdout ----
assertion failed

failures:
    ipv6_is_untouched

test result: FAILED. 33 passed; 1 failed; 0 ignored; 0 measured; 0 filtered out; finished in 30.28s
FERRY-VM: end packets 101
FERRY-VM: begin uplink

running 11 tests
known kernel limitation: no ctx
test result: ok. 11 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; finished in 3.1s
FERRY-VM: note uplink no ctx
FERRY-VM: end uplink 0
FERRY-VM: begin sock

running 6 tests
test result: ok. 6 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; finished in 5.3s
FERRY-VM: end sock 0
FERRY-VM: done";

#[test]
fn passing_probe_and_failing_suite() {
    let (programs, tests) = read_outcome(&lines(PASSING));
    assert_eq!(programs, Programs::Loaded);
    assert_eq!(
        tests,
        [
            Tests::Counted {
                passed: 33,
                failed: 1,
                failures: vec!["ipv6_is_untouched".into()]
            },
            Tests::Counted {
                passed: 11,
                failed: 0,
                failures: Vec::new()
            },
            Tests::Counted {
                passed: 6,
                failed: 0,
                failures: Vec::new()
            }
        ]
    );
    let run = Run {
        lines: lines(PASSING),
        timed_out: false,
        status: Some(0),
        seconds: 1.0,
    };
    let outcome = Outcome::from_run("k".into(), "TCG", &run, RUN_TIMEOUT, Path::new("/l"));
    assert_eq!(
        outcome.notes,
        [Vec::<String>::new(), vec!["no ctx".into()], Vec::new()]
    );
    let text = table(&[outcome], &[]);
    assert!(
        text.contains("11 passed, 0 failed (kernel limitation, see below)"),
        "{text}"
    );
    assert!(
        text.contains("k: uplink tests: known kernel limitation, worked around: no ctx"),
        "{text}"
    );
}

#[test]
fn rejected_program_keeps_the_verifier_message() {
    let mut transcript = String::from(
            "FERRY-VM: kernel 5.10.0-32-cloud-amd64\nFERRY-VM: begin probe\nrunning 1 test\n\
             test arp_is_untouched ... FAILED\n\nfailures:\n\n---- arp_is_untouched stdout ----\n\n\
             thread 'arp_is_untouched' panicked at proxy-agent/tests/privileged_packets.rs:89:44:\n\
             load the programs: the verifier rejected from_pod\n\nCaused by:\n    \
             0: the BPF_PROG_LOAD syscall returned Invalid argument (os error 22). Verifier output: 0: (61) r9 = *(u32 *)(r1 +0)\n",
        );
    for i in 1..40 {
        let _ = writeln!(transcript, "       {i}: (bf) r1 = r6");
    }
    transcript.push_str(
            "       infinite loop detected at insn 314\n       processed 493 insns (limit 1000000)\n       \n    \
             1: Invalid argument (os error 22)\nnote: run with `RUST_BACKTRACE=1`\n\nfailures:\n    arp_is_untouched\n\n\
             test result: FAILED. 0 passed; 1 failed; 0 ignored; 0 measured; 33 filtered out\n\
             FERRY-VM: end probe 101\nFERRY-VM: suites skipped\nFERRY-VM: done\n",
        );
    let (programs, tests) = read_outcome(&lines(&transcript));
    assert_eq!(tests, [Tests::Skipped, Tests::Skipped, Tests::Skipped]);
    let Programs::Rejected { program, message } = programs else {
        panic!("{programs:?}");
    };
    assert_eq!(program.as_deref(), Some("from_pod"));
    assert!(
        message.starts_with("load the programs: the verifier rejected from_pod\nCaused by:\n"),
        "{message}"
    );
    assert!(
        message.contains("infinite loop detected at insn 314"),
        "{message}"
    );
    assert!(
        message.contains("lines of the log before these"),
        "{message}"
    );
    assert!(
        message.ends_with("    1: Invalid argument (os error 22)"),
        "{message}"
    );
    assert!(
        !message.contains(" 5: (bf)"),
        "only the end of the log: {message}"
    );
}

#[test]
fn a_run_that_stops_early_is_unfinished() {
    let (programs, tests) = read_outcome(&lines(
        "FERRY-VM: kernel 6.1.0-1-cloud-amd64\nFERRY-VM: begin probe\n",
    ));
    assert_eq!(programs, Programs::Unknown("probe unfinished".into()));
    let not_started = || Tests::Unfinished("did not start".into());
    assert_eq!(tests, [not_started(), not_started(), not_started()]);
    let (_, tests) = read_outcome(&lines(
        "FERRY-VM: begin probe\nFERRY-VM: end probe 0\nFERRY-VM: begin packets\ntest a ... ok\n",
    ));
    assert_eq!(
        tests,
        [
            Tests::Unfinished("stopped during the tests".into()),
            not_started(),
            not_started()
        ]
    );
}
