//! How much memory the CPU backend's buffers may still take. Its buffers are mapped lazily
//! (zeroed pages appear when first written), so allocating far more than the machine has
//! succeeds, and the kernel's OOM killer ends the process later, mid-step, without a word. The
//! network asks here first, and refuses a batch that cannot fit with a message that says so.

/// Bytes available to new buffers: the kernel's `MemAvailable`, or less where this process's
/// control group (a container's, or a Slurm job's) has a memory limit closer to its use, or
/// where `limit` (the job's `--memory-limit`) is lower. `None` where none of these can be read.
pub fn available_bytes(limit: Option<u64>) -> Option<u64> {
    let system = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| meminfo_available(&m));
    [system, cgroup_headroom(), limit]
        .into_iter()
        .flatten()
        .min()
}

/// `MemAvailable` of `/proc/meminfo`, in bytes.
fn meminfo_available(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// The room left under the tightest memory limit of this process's control group and of the
/// groups above it (a Slurm job sets its limit on the job's group, a level above the task's):
/// cgroup v2 (`memory.max`, `memory.current`), else v1 (`memory.limit_in_bytes`,
/// `memory.usage_in_bytes`). The page cache's inactive part (files read, such as shards) is
/// counted as room, since the kernel drops it before it fails an allocation.
fn cgroup_headroom() -> Option<u64> {
    let read = |p: &str| std::fs::read_to_string(p).ok();
    let groups = read("/proc/self/cgroup").unwrap_or_default();
    let tightest = |root: &str, group: &str, files: [&str; 3]| {
        ancestors(group)
            .filter_map(|dir| {
                let at = |f: &str| read(&format!("{root}{dir}/{f}"));
                headroom(&at(files[0])?, &at(files[1])?, at(files[2]).as_deref())
            })
            .min()
    };
    let v2 = (groups.lines().find_map(|l| l.strip_prefix("0::"))).and_then(|g| {
        tightest(
            "/sys/fs/cgroup",
            g,
            ["memory.max", "memory.current", "memory.stat"],
        )
    });
    v2.or_else(|| {
        // v1: the memory controller's line ("4:memory:/path"); inside a container whose
        // path is not mounted, the mount's root is the container's own group.
        let group = groups
            .lines()
            .find_map(|l| l.split_once(":memory:").map(|(_, g)| g))
            .unwrap_or("/");
        let files = [
            "memory.limit_in_bytes",
            "memory.usage_in_bytes",
            "memory.stat",
        ];
        tightest("/sys/fs/cgroup/memory", group, files)
    })
}

/// `/a/b` and its ancestors: `/a/b`, `/a`, and the root (as the empty string, so that paths
/// join as `{root}{dir}/{file}`).
fn ancestors(group: &str) -> impl Iterator<Item = String> + '_ {
    let group = group.trim().trim_end_matches('/');
    std::iter::successors(Some(group.to_string()), |g| {
        (!g.is_empty()).then(|| {
            g.rsplit_once('/')
                .map_or(String::new(), |(up, _)| up.into())
        })
    })
}

/// `limit - (usage - inactive page cache)`, from a control group's files; `None` for no limit
/// (`max` in v2, a value near `i64::MAX` in v1).
fn headroom(limit: &str, usage: &str, stat: Option<&str>) -> Option<u64> {
    let limit: u64 = limit.trim().parse().ok()?;
    let usage: u64 = usage.trim().parse().ok()?;
    // v1 gives the group's own and, as total_, its subtree's; v2 the subtree's, unprefixed.
    let stat_value = |key: &str| {
        stat?.lines().find_map(|l| {
            let (k, v) = l.split_once(' ')?;
            (k == key).then(|| v.trim().parse::<u64>().ok())?
        })
    };
    let inactive = (stat_value("total_inactive_file"))
        .or_else(|| stat_value("inactive_file"))
        .unwrap_or(0);
    (limit < 1 << 60).then(|| limit.saturating_sub(usage.saturating_sub(inactive)))
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
        // v2 "max" and v1's "unlimited" are no limit; a real one leaves limit - usage, the
        // inactive page cache counted as room (v2 and v1 name it differently).
        assert_eq!(headroom("max\n", "123\n", None), None);
        assert_eq!(
            headroom("9223372036854771712\n", "5027917824\n", None),
            None
        );
        assert_eq!(
            headroom("8589934592\n", "1073741824\n", None),
            Some(7 << 30)
        );
        let v2 = "anon 5\nfile 9\ninactive_file 1073741824\nactive_file 3\n";
        assert_eq!(
            headroom("8589934592", "2147483648", Some(v2)),
            Some(7 << 30)
        );
        let v1 = "cache 9\ninactive_file 1\ntotal_inactive_file 1073741824\n";
        assert_eq!(
            headroom("8589934592", "2147483648", Some(v1)),
            Some(7 << 30)
        );
        assert_eq!(headroom("100\n", "200\n", None), Some(0));
        // A group's ancestors, up to the root.
        let up: Vec<String> = ancestors("/slurm/job_7/step_0\n").collect();
        assert_eq!(up, ["/slurm/job_7/step_0", "/slurm/job_7", "/slurm", ""]);
        assert_eq!(ancestors("/").collect::<Vec<_>>(), [""]);
        // This machine: something is known.
        #[cfg(target_os = "linux")]
        assert!(available_bytes(None).is_some());
    }
}
