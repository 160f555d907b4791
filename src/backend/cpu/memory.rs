//! How much memory the CPU backend's buffers may still take. Its buffers are mapped lazily
//! (zeroed pages appear when first written), so allocating far more than the machine has
//! succeeds, and the kernel's OOM killer ends the process later, mid-step, without a word. The
//! network asks here first, and refuses a batch that cannot fit with a message that says so.

/// Bytes available to new buffers: the kernel's `MemAvailable`, or less where this process's
/// control group (a container's, or a Slurm job's) has a memory limit closer to its use.
/// `None` where neither can be read (not Linux).
pub fn available_bytes() -> Option<u64> {
    let system = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| meminfo_available(&m));
    let group = cgroup_headroom();
    match (system, group) {
        (Some(s), Some(g)) => Some(s.min(g)),
        (s, g) => s.or(g),
    }
}

/// `MemAvailable` of `/proc/meminfo`, in bytes.
fn meminfo_available(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// The room left under this process's control group's memory limit, if it has one: cgroup
/// v2 (`memory.max`, `memory.current` of the group `/proc/self/cgroup` names), else v1.
fn cgroup_headroom() -> Option<u64> {
    let read = |p: &str| std::fs::read_to_string(p).ok();
    let v2 = read("/proc/self/cgroup").and_then(|c| {
        let path = c
            .lines()
            .find_map(|l| l.strip_prefix("0::"))?
            .trim()
            .to_string();
        let dir = format!("/sys/fs/cgroup{}", path.trim_end_matches('/'));
        headroom(
            &read(&format!("{dir}/memory.max"))?,
            &read(&format!("{dir}/memory.current"))?,
        )
    });
    v2.or_else(|| {
        headroom(
            &read("/sys/fs/cgroup/memory/memory.limit_in_bytes")?,
            &read("/sys/fs/cgroup/memory/memory.usage_in_bytes")?,
        )
    })
}

/// `limit - usage`, from a control group's files; `None` for no limit (`max` in v2, a value
/// near `i64::MAX` in v1).
fn headroom(limit: &str, usage: &str) -> Option<u64> {
    let limit: u64 = limit.trim().parse().ok()?;
    let usage: u64 = usage.trim().parse().ok()?;
    (limit < 1 << 60).then(|| limit.saturating_sub(usage))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_meminfo_and_control_group_limits() {
        let meminfo =
            "MemTotal:       24576000 kB\nMemFree:  100 kB\nMemAvailable:   20000000 kB\n";
        assert_eq!(meminfo_available(meminfo), Some(20_000_000 * 1024));
        assert_eq!(meminfo_available("MemTotal: 5 kB\n"), None);
        // v2 "max" and v1's "unlimited" are no limit; a real one leaves limit - usage.
        assert_eq!(headroom("max\n", "123\n"), None);
        assert_eq!(headroom("9223372036854771712\n", "5027917824\n"), None);
        assert_eq!(headroom("8589934592\n", "1073741824\n"), Some(7 << 30));
        assert_eq!(headroom("100\n", "200\n"), Some(0));
        // This machine: something is known, and it is not zero.
        #[cfg(target_os = "linux")]
        assert!(available_bytes().is_some_and(|b| b > 0));
    }
}
