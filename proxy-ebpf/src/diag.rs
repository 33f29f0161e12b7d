//! Diagnostics of rare paths, through aya-log's ring buffer to the agent's
//! log: what a verdict counter cannot tell, such as the error code of the
//! helper that failed. The path records the code (`record`), and the line is
//! written at the programs' exit (`log_drop`), where the call chain is
//! shallow: aya-log builds its record on the stack, and inside the paths a
//! chain of calls has no room left for it within 5.10's 512 bytes. The
//! level is a load-time constant (`AYA_LOG_LEVEL`, the agent's
//! `--bpf-log-level`): the verifier drops the lines of disabled levels.

use proxy_common::stats::Stat;

use crate::maps::DIAG;

/// Records `code`, the error of the helper a rare path just saw fail.
#[inline(always)]
pub fn record(code: i64) {
    if let Some(slot) = DIAG.get_ptr_mut(0) {
        // SAFETY: this CPU's slot; nothing else runs on it meanwhile.
        unsafe { *slot = code };
    }
}

/// Logs a drop whose path recorded an error.
#[inline(always)]
pub fn log_drop(stat: Stat) {
    if stat == Stat::DropFib || stat == Stat::DropCtInsert {
        // SAFETY: as in `record`.
        let code = DIAG.get_ptr_mut(0).map_or(0, |slot| unsafe { *slot });
        ferry_log_drop(stat.index(), code);
    }
}

/// The log line of `log_drop`: a global function, which the verifier walks
/// once, not in every path that ends in such a drop (as inline code, it
/// doubled what to_pod costs the verifier). Plain-number arguments, as 5.10
/// asks of a global function; the return value means nothing.
#[no_mangle]
#[inline(never)]
pub extern "C" fn ferry_log_drop(stat: u32, code: i64) -> u32 {
    // Each line's text is a literal: a string argument of unknown length
    // would cost the verifier a copy loop.
    if stat == Stat::DropFib.index() {
        aya_log_ebpf::warn!((), "drop_fib: the FIB lookup returned {}", code);
    } else {
        aya_log_ebpf::warn!(
            (),
            "drop_ct_insert: conntrack insert failed, error {}",
            code
        );
    }
    0
}
