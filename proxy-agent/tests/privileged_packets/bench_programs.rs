//! The NodePort throughput benchmark's generator and receiver
//! (`bench_gen`, `bench_sink`), run with BPF_PROG_TEST_RUN one frame at a
//! time (not in live-frames mode): every byte of the frame the generator
//! sends and its verdict, and what the receiver counts of each kind of
//! frame. The benchmark's figures are only as right as these two.

use aya::{
    maps::{Array, PerCpuArray},
    programs::{TestRun, TestRunOptions, Xdp},
    Ebpf, EbpfLoader,
};
use proxy_common::bench::{
    GenConfig, SinkCounts, FRAME_LEN4, FRAME_LEN6, FRAME_MAP, GENERATOR, GEN_MAP, SINK, SINK_MAP,
};

use super::*;

const XDP_DROP: u32 = 1;
const XDP_REDIRECT: u32 = 4;

static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/ferry.bpf.o"));

/// Where an IPv4 frame's UDP source port is.
const SPORT: usize = 14 + 20;

/// The object with the two programs loaded, the generator's frame and
/// settings written.
fn load(frame: &[u8], config: GenConfig) -> Ebpf {
    let mut ebpf = EbpfLoader::new().load(OBJECT).expect("load the object");
    for name in [GENERATOR, SINK] {
        let program: &mut Xdp = ebpf.program_mut(name).unwrap().try_into().unwrap();
        program.load().unwrap_or_else(|e| panic!("{name}: {e:#}"));
    }
    let mut stored = [0u8; FRAME_LEN6];
    stored[..frame.len()].copy_from_slice(frame);
    Array::<_, [u8; FRAME_LEN6]>::try_from(ebpf.map_mut(FRAME_MAP).unwrap())
        .unwrap()
        .set(0, stored, 0)
        .unwrap();
    Array::<_, GenConfig>::try_from(ebpf.map_mut(GEN_MAP).unwrap())
        .unwrap()
        .set(0, config, 0)
        .unwrap();
    ebpf
}

/// Runs `program` once on `frame`: its verdict and the frame it leaves.
fn run(ebpf: &Ebpf, program: &str, frame: &[u8]) -> (u32, Vec<u8>) {
    let program: &Xdp = ebpf.program(program).unwrap().try_into().unwrap();
    let mut out = vec![0u8; frame.len() + 256];
    let result = program
        .test_run(TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            ..Default::default()
        })
        .expect("BPF_PROG_TEST_RUN");
    out.truncate(result.data_size_out as usize);
    (result.return_value, out)
}

/// The receiver's counts, summed over the CPUs.
fn counts(ebpf: &Ebpf) -> SinkCounts {
    let map = PerCpuArray::<_, SinkCounts>::try_from(ebpf.map(SINK_MAP).unwrap()).unwrap();
    map.get(&0, 0)
        .unwrap()
        .iter()
        .fold(SinkCounts::default(), |a, c| SinkCounts {
            expected: a.expected + c.expected,
            other: a.other + c.other,
        })
}

/// The benchmark's kind of frame: UDP from a client to a NodePort, headers
/// and 12 bytes of payload.
fn udp(sport: u16, daddr: &str, dport: u16) -> Vec<u8> {
    let mut f = Frame::udp("172.30.1.2", sport, daddr, dport);
    f.payload = b"ferry bench!".to_vec();
    let bytes = f.bytes();
    assert_eq!(
        bytes.len(),
        FRAME_LEN4,
        "the generator's frames are FRAME_LEN4 long"
    );
    bytes
}

#[test]
fn the_generator_sends_its_frame_from_each_flows_source_port_in_turn() {
    // The generator numbers its runs per CPU.
    super::schedulers::pin_to_cpu0();
    let frame = udp(40000, "10.250.0.11", 30053);
    let config = GenConfig {
        ifindex: 7,
        flows: 3,
        ..GenConfig::default()
    };
    let ebpf = load(&frame, config);
    // What the page pool hands it: whatever the last trip left.
    let garbage = vec![0xa5; FRAME_LEN4];
    let mut ports = Vec::new();
    for _ in 0..7 {
        let (verdict, out) = run(&ebpf, GENERATOR, &garbage);
        assert_eq!(verdict, XDP_REDIRECT);
        assert_eq!(out.len(), FRAME_LEN4);
        let port = u16::from_be_bytes([out[SPORT], out[SPORT + 1]]);
        // Every other byte is the frame's.
        let mut expected = frame.clone();
        expected[SPORT..SPORT + 2].copy_from_slice(&port.to_be_bytes());
        assert_eq!(out, expected);
        ports.push(port);
    }
    // Runs 1, 2, 3, ... of this CPU: flows 1, 2, 0, 1, ...
    assert_eq!(ports, [40001, 40002, 40000, 40001, 40002, 40000, 40001]);

    // One flow: the frame as it is.
    let ebpf = load(&frame, GenConfig { flows: 1, ..config });
    assert_eq!(
        run(&ebpf, GENERATOR, &garbage),
        (XDP_REDIRECT, frame.clone())
    );
    // A frame too short for the generator's: aborted, not sent.
    let (verdict, _) = run(&ebpf, GENERATOR, &garbage[..FRAME_LEN4 - 1]);
    assert_eq!(verdict, 0, "XDP_ABORTED");
}

#[test]
fn the_receiver_counts_frames_translated_as_expected_apart_and_drops_all() {
    let config = GenConfig {
        expect_daddr: [10, 244, 2, 3],
        expect_dport_be: 8053u16.to_be(),
        ..GenConfig::default()
    };
    let ebpf = load(&udp(40000, "10.250.0.11", 30053), config);
    let frames = [
        // Translated to the backend: expected.
        udp(40000, "10.244.2.3", 8053),
        udp(40007, "10.244.2.3", 8053),
        // Not translated, or to another port or address: other.
        udp(40000, "10.250.0.11", 30053),
        udp(40000, "10.244.2.3", 8054),
        udp(40000, "10.244.2.4", 8053),
    ];
    for frame in &frames {
        assert_eq!(run(&ebpf, SINK, frame).0, XDP_DROP);
    }
    // Not UDP over IPv4: neither.
    let tcp = Frame::tcp("172.30.1.2", 40000, "10.244.2.3", 8053).bytes();
    assert_eq!(run(&ebpf, SINK, &tcp).0, XDP_DROP);
    assert_eq!(run(&ebpf, SINK, &tcp[..20]).0, XDP_DROP);
    assert_eq!(
        counts(&ebpf),
        SinkCounts {
            expected: 2,
            other: 3
        }
    );
}
