//! The TCP data plane, in one process: ranks on threads over loopback train exactly like one
//! process holding the whole network, send exactly the bytes the layer shapes give, and fail
//! within the timeout (naming the peer) when a peer goes away.

mod common;

use alexnet::backend::{Cpu, SgdParams};
use alexnet::comm::replica::RING_BLOCK;
use alexnet::comm::{connect_tcp, BufReduce, LocalExchange, MeshKey, Segment, Topology};
use alexnet::model::shapes::column_bytes_per_step;
use alexnet::model::{NetConfig, Network};
use alexnet::train::train_step;
use common::{assert_close, random};
use std::collections::BTreeMap;
use std::net::TcpListener;
use std::time::{Duration, Instant};

fn key() -> MeshKey {
    MeshKey::new(42, 0, "the job's token")
}

fn net_cfg() -> NetConfig {
    NetConfig {
        init_std: 0.2,
        ..NetConfig::narrow(63, [4, 8, 8, 8, 4], [8, 8], 4)
    }
}

const SGD: SgdParams = SgdParams {
    lr: 0.01,
    momentum: 0.9,
    weight_decay: 0.0005,
};

struct RankResult {
    rank: usize,
    params: Vec<(usize, String, Vec<f32>)>,
    losses: Vec<f32>,
    column_bytes: (u64, u64),
    replica_bytes: u64,
}

/// A listener on a loopback port for each of `world` ranks, and their addresses.
fn loopback_ranks(world: usize) -> (Vec<TcpListener>, BTreeMap<usize, String>) {
    let listeners: Vec<TcpListener> = (0..world)
        .map(|_| TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    let addrs = (listeners.iter().enumerate())
        .map(|(r, l)| (r, l.local_addr().unwrap().to_string()))
        .collect();
    (listeners, addrs)
}

/// Trains `steps` steps on every rank of `topology`, one thread each, over loopback TCP.
fn train_ranks(
    topology: Topology,
    x: &[f32],
    labels: &[u32],
    steps: u64,
    seed: u64,
) -> Vec<RankResult> {
    let (listeners, addrs) = loopback_ranks(topology.world_size());
    let per = net_cfg().in_channels * 63 * 63;
    let local_batch = labels.len() / topology.replicas;
    let threads: Vec<_> = listeners
        .into_iter()
        .enumerate()
        .map(|(rank, listener)| {
            let addrs = addrs.clone();
            let place = topology.placement(rank);
            let rows = place.replica * local_batch..(place.replica + 1) * local_batch;
            let x = x[rows.start * per..rows.end * per].to_vec();
            let labels = labels[rows].to_vec();
            std::thread::spawn(move || {
                let ex = connect_tcp::<Cpu>(
                    &topology,
                    rank,
                    &listener,
                    &addrs,
                    key(),
                    Duration::from_secs(30),
                )
                .unwrap();
                let mut net =
                    Network::new(net_cfg(), Cpu::with_threads(1), ex.columns, seed).unwrap();
                if let Some(group) = ex.replicas {
                    net.join_replicas(group, place.replica, local_batch)
                        .unwrap();
                }
                let losses = (0..steps)
                    .map(|s| train_step(&mut net, &x, &labels, s, &SGD).unwrap().loss)
                    .collect();
                let t = net.column_traffic();
                RankResult {
                    rank,
                    params: net
                        .params()
                        .map(|(c, p)| (c, p.name.clone(), p.value.clone()))
                        .collect(),
                    losses,
                    column_bytes: (t.sent_bytes, t.received_bytes),
                    replica_bytes: net.replica_traffic().sent_bytes,
                }
            })
        })
        .collect();
    threads.into_iter().map(|t| t.join().unwrap()).collect()
}

fn check_against_one_process(topology: Topology) {
    check_against_one_process_for(topology, 5, 1e-5)
}

/// As [`check_against_one_process`], for `steps` steps, the parameters within `tolerance`
/// (relative) of one process's.
fn check_against_one_process_for(topology: Topology, steps: u64, tolerance: f64) {
    let (batch, seed) = (4, 17);
    let x: Vec<f32> = random(3 * 63 * 63 * batch, 8)
        .iter()
        .map(|v| 3.0 * v)
        .collect();
    let labels = vec![2u32, 0, 3, 1];
    let mut whole = Network::new(
        net_cfg(),
        Cpu::new(),
        Box::new(LocalExchange::default()),
        seed,
    )
    .unwrap();
    let losses: Vec<f32> = (0..steps)
        .map(|s| train_step(&mut whole, &x, &labels, s, &SGD).unwrap().loss)
        .collect();
    let ranks = train_ranks(topology, &x, &labels, steps, seed);
    assert_eq!(ranks.len(), topology.world_size());
    for r in &ranks {
        assert!(!r.params.is_empty());
        for (column, name, value) in &r.params {
            let reference = whole
                .params()
                .find(|(c, p)| c == column && &p.name == name)
                .unwrap()
                .1;
            assert_close(
                &format!("rank {} column {column} {name} after {steps} steps", r.rank),
                value,
                &reference.value,
                tolerance,
            );
        }
        if topology.replicas == 1 {
            // The loss of one replica is the loss of the whole batch.
            for (a, b) in r.losses.iter().zip(&losses) {
                assert!(
                    (a - b).abs() <= 1e-5 * b.abs(),
                    "rank {}: loss {a} vs {b}",
                    r.rank
                );
            }
        }
    }
    if topology.replicas > 1 {
        // Every replica of a column ends with the same bits: they average their gradients
        // bucket by bucket while the backward pass goes on, and must never drift apart.
        for r in &ranks {
            let first = ranks
                .iter()
                .find(|o| topology.placement(o.rank).columns == topology.placement(r.rank).columns)
                .unwrap();
            for ((_, name, a), (_, _, b)) in r.params.iter().zip(&first.params) {
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert!(
                    bits(a) == bits(b),
                    "rank {} and rank {} differ in {name}",
                    r.rank,
                    first.rank
                );
            }
        }
        // The global loss is the mean of the replicas' losses.
        assert!(losses.len() >= steps as usize, "a loss for every step");
        for (s, loss) in losses.iter().enumerate().take(steps as usize) {
            let per_replica: Vec<f32> = ranks
                .iter()
                .filter(|r| topology.placement(r.rank).columns[0] == 0)
                .map(|r| r.losses[s])
                .collect();
            let mean = per_replica.iter().sum::<f32>() / per_replica.len() as f32;
            assert!((mean - loss).abs() <= 1e-5 * loss.abs());
        }
    }
}

/// The exactness check of the distributed runtime, on threads: the processes' version runs in
/// tests/distributed.rs.
#[test]
fn two_columns_over_tcp_train_like_one_process() {
    check_against_one_process(Topology {
        replicas: 1,
        columns_per_worker: 1,
        elastic: None,
    });
}

#[test]
fn two_replicas_of_two_columns_over_tcp_train_like_one_process_on_the_whole_batch() {
    check_against_one_process(Topology {
        replicas: 2,
        columns_per_worker: 1,
        elastic: None,
    });
}

#[test]
fn two_replicas_holding_both_columns_train_like_one_process() {
    check_against_one_process(Topology {
        replicas: 2,
        columns_per_worker: 2,
        elastic: None,
    });
}

/// Four replicas of the pair, eight ranks: the replicas average over the ring (reduce-scatter
/// then all-gather), and still train like one process on the whole batch, every replica of a
/// column with the same bits.
#[test]
fn four_replicas_of_two_columns_over_a_ring_train_like_one_process_on_the_whole_batch() {
    let four = Topology {
        replicas: 4,
        columns_per_worker: 1,
        elastic: None,
    };
    check_against_one_process_for(four, 6, 1e-6);
}

/// The replicas' groups of `r` ranks (one replica each, both columns), over loopback TCP.
fn replica_groups(r: usize) -> Vec<Box<dyn BufReduce<Cpu>>> {
    let topology = Topology {
        replicas: r,
        columns_per_worker: 2,
        elastic: None,
    };
    let (listeners, addrs) = loopback_ranks(r);
    let threads: Vec<_> = (listeners.into_iter().enumerate())
        .map(|(rank, listener)| {
            let addrs = addrs.clone();
            std::thread::spawn(move || {
                connect_tcp::<Cpu>(
                    &topology,
                    rank,
                    &listener,
                    &addrs,
                    key(),
                    Duration::from_secs(30),
                )
                .unwrap()
                .replicas
                .unwrap()
            })
        })
        .collect();
    threads.into_iter().map(|t| t.join().unwrap()).collect()
}

/// Averages `data[i]` (replica `i`'s buffer) over the groups, cut into buckets at `cuts`,
/// each bucket laid out at its position; every replica's result.
fn ring_mean(
    groups: &mut [Box<dyn BufReduce<Cpu>>],
    data: &[Vec<f32>],
    cuts: &[usize],
) -> Vec<Vec<f32>> {
    let n = data[0].len();
    let bounds: Vec<usize> = std::iter::once(0)
        .chain(cuts.iter().copied())
        .chain([n])
        .collect();
    std::thread::scope(|s| {
        let handles: Vec<_> = (groups.iter_mut().zip(data))
            .map(|(g, mine)| {
                let bounds = &bounds;
                s.spawn(move || {
                    let cpu = Cpu::with_threads(1);
                    for w in bounds.windows(2) {
                        let layout = vec![Segment {
                            at: w[0] as u64,
                            len: w[1] - w[0],
                        }];
                        g.submit(&cpu, mine[w[0]..w[1]].to_vec(), layout).unwrap();
                    }
                    let mut out = Vec::new();
                    for _ in bounds.windows(2) {
                        out.extend(g.take_next(&cpu).unwrap());
                    }
                    out
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

/// The ring's sum, value by value: class `c` of a value (its block of the layout, modulo the
/// replica count) is summed in ring order from replica `c`, then scaled by 1 / R.
#[test]
fn the_ring_average_is_exact_the_same_on_every_replica_and_moves_the_rings_bytes() {
    for r in [3usize, 4] {
        let mut groups = replica_groups(r);
        // Three blocks per class: the classes are equal, and the bytes exactly the formula.
        let n = r * RING_BLOCK as usize * 3;
        let data: Vec<Vec<f32>> = (0..r).map(|i| random(n, 100 + i as u64)).collect();
        let got = ring_mean(&mut groups, &data, &[]);
        let scale = 1.0 / r as f32;
        let want: Vec<f32> = (0..n)
            .map(|g| {
                let c = (g as u64 / RING_BLOCK) as usize % r;
                let mut sum = data[c][g];
                for j in 1..r {
                    sum += data[(c + j) % r][g];
                }
                sum * scale
            })
            .collect();
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        for (i, mine) in got.iter().enumerate() {
            assert!(
                bits(mine) == bits(&want),
                "{r} replicas: replica {i} differs from the ring's sum"
            );
        }
        // Within float rounding of the exact mean.
        let exact: Vec<f32> = (0..n)
            .map(|g| (data.iter().map(|d| d[g] as f64).sum::<f64>() / r as f64) as f32)
            .collect();
        assert_close(&format!("{r} replicas: the mean"), &got[0], &exact, 1e-6);
        // Each rank sent 2 (R - 1) / R of the buffer, payload alone.
        for (i, g) in groups.iter().enumerate() {
            let sent = g.traffic().sent_bytes;
            assert_eq!(
                sent,
                (4 * n * 2 * (r - 1) / r) as u64,
                "{r} replicas: replica {i}"
            );
        }
        // Cut into buckets anywhere (mid-block too), each laid out at its position: the same
        // bits, since a value's order of summation depends on its position alone.
        let cut = ring_mean(
            &mut groups,
            &data,
            &[1000, RING_BLOCK as usize * 2 + 7, n - 3],
        );
        for mine in &cut {
            assert!(bits(mine) == bits(&want), "{r} replicas: cut into buckets");
        }
    }
}

/// The bytes the TCP links counted are exactly what the exchange points' shapes give (so
/// nothing else crosses between the columns), and the replicas exchange only gradients.
#[test]
fn columns_send_exactly_the_exchange_points_bytes() {
    let (batch, steps) = (2, 3);
    let x = random(3 * 63 * 63 * batch * 2, 3);
    let labels = vec![0u32, 1, 2, 3];
    let ranks = train_ranks(
        Topology {
            replicas: 2,
            columns_per_worker: 1,
            elastic: None,
        },
        &x,
        &labels,
        steps,
        5,
    );
    let want = column_bytes_per_step(&net_cfg(), batch).unwrap().total() * steps;
    let params: u64 =
        alexnet::model::params::parameter_count(&net_cfg(), &net_cfg().validate().unwrap()) as u64;
    for r in &ranks {
        assert_eq!(r.column_bytes, (want, want), "rank {}", r.rank);
        let own: u64 = r.params.iter().map(|p| p.2.len() as u64).sum();
        assert_eq!(own * 2, params, "a column holds half the parameters");
        assert_eq!(r.replica_bytes, own * 4 * steps, "rank {}", r.rank);
    }
}

/// SPEC.md's figures for the paper's network at batch 128: 10.6 MiB (pool2), 2.25 MiB (pool5),
/// 1 MiB (fc6), 1 MiB (fc7) and 0.25 MiB (logits) per column and direction.
#[test]
fn the_papers_exchange_at_batch_128_matches_the_spec() {
    let b = column_bytes_per_step(&NetConfig::default(), 128).unwrap();
    let mib = |v: u64| v as f64 / (1 << 20) as f64;
    let fwd: Vec<f64> = b.forward.iter().map(|&v| mib(v)).collect();
    assert!((fwd[0] - 10.5625).abs() < 1e-9, "pool2 {}", fwd[0]);
    assert_eq!(&fwd[1..4], &[2.25, 1.0, 1.0]);
    // 500 logits x 128 x 4 bytes: the spec's "0.25 MiB" is rounded.
    assert_eq!(b.forward[4], 500 * 128 * 4);
    assert_eq!(b.backward[..4], b.forward[..4]);
    assert_eq!(
        b.backward[4], 0,
        "both columns hold the whole logits' gradient"
    );
}

/// A peer that goes away mid-run is an error naming it within the timeout, not a hang; and a
/// stranger knocking on the data-plane port is refused without disturbing the mesh.
#[test]
fn a_dead_peer_is_named_within_the_timeout_and_strangers_are_refused() {
    let topology = Topology {
        replicas: 1,
        columns_per_worker: 1,
        elastic: None,
    };
    let l0 = TcpListener::bind("127.0.0.1:0").unwrap();
    let l1 = TcpListener::bind("127.0.0.1:0").unwrap();
    let addrs: BTreeMap<usize, String> = [
        (0, l0.local_addr().unwrap().to_string()),
        (1, l1.local_addr().unwrap().to_string()),
    ]
    .into();
    // Garbage and a handshake from another job, before rank 1 connects.
    let target = l0.local_addr().unwrap();
    let mut junk = std::net::TcpStream::connect(target).unwrap();
    std::io::Write::write_all(&mut junk, &[0xffu8; 64]).unwrap();
    let timeout = Duration::from_secs(2);
    let other_job = std::thread::spawn(move || {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let a: BTreeMap<usize, String> = [(0, target.to_string())].into();
        let wrong = MeshKey::new(7, 0, "the job's token");
        connect_tcp::<Cpu>(&topology, 1, &l, &a, wrong, Duration::from_secs(2)).err()
    });
    assert!(
        other_job.join().unwrap().is_some(),
        "another job's rank was let in"
    );
    let a1 = addrs.clone();
    let rank1 = std::thread::spawn(move || {
        let ex = connect_tcp::<Cpu>(&topology, 1, &l1, &a1, key(), timeout).unwrap();
        drop(ex); // dies right after joining
    });
    let ex = connect_tcp::<Cpu>(&topology, 0, &l0, &addrs, key(), timeout).unwrap();
    rank1.join().unwrap();
    let mut net = Network::new(net_cfg(), Cpu::new(), ex.columns, 1).unwrap();
    let x = random(3 * 63 * 63, 1);
    let t = Instant::now();
    let err = train_step(&mut net, &x, &[0], 0, &SGD).unwrap_err();
    let msg = format!("{err:#}");
    assert!(msg.contains("rank 1"), "{msg}");
    assert!(t.elapsed() < timeout + Duration::from_secs(5));
}

/// A peer that stays connected but silent is an error after the timeout.
#[test]
fn a_silent_peer_times_out() {
    let topology = Topology {
        replicas: 1,
        columns_per_worker: 1,
        elastic: None,
    };
    let l0 = TcpListener::bind("127.0.0.1:0").unwrap();
    let l1 = TcpListener::bind("127.0.0.1:0").unwrap();
    let addrs: BTreeMap<usize, String> = [
        (0, l0.local_addr().unwrap().to_string()),
        (1, l1.local_addr().unwrap().to_string()),
    ]
    .into();
    let timeout = Duration::from_millis(700);
    let a1 = addrs.clone();
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let rank1 = std::thread::spawn(move || {
        let ex = connect_tcp::<Cpu>(&topology, 1, &l1, &a1, key(), timeout).unwrap();
        let _ = rx.recv(); // holds the connection open, sends nothing
        drop(ex);
    });
    let ex = connect_tcp::<Cpu>(&topology, 0, &l0, &addrs, key(), timeout).unwrap();
    let mut net = Network::new(net_cfg(), Cpu::new(), ex.columns, 1).unwrap();
    let t = Instant::now();
    let err = train_step(&mut net, &random(3 * 63 * 63, 1), &[0], 0, &SGD).unwrap_err();
    let msg = format!("{err:#}");
    assert!(
        msg.contains("rank 1") && msg.contains("sent nothing"),
        "{msg}"
    );
    assert!(t.elapsed() >= timeout && t.elapsed() < timeout * 10);
    tx.send(()).unwrap();
    rank1.join().unwrap();
}

/// Only holders of the job's token join the data plane: a process of the same job id and
/// generation but another token is refused by the rank it calls, and a rank does not connect
/// to a listener that cannot prove the token.
#[test]
fn a_peer_without_the_token_is_refused_both_ways() {
    let topology = Topology {
        replicas: 1,
        columns_per_worker: 1,
        elastic: None,
    };
    let timeout = Duration::from_secs(2);
    let l0 = TcpListener::bind("127.0.0.1:0").unwrap();
    let addrs: BTreeMap<usize, String> = [(0, l0.local_addr().unwrap().to_string())].into();
    let a = addrs.clone();
    let impostor = std::thread::spawn(move || {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let forged = MeshKey::new(42, 0, "a guess");
        connect_tcp::<Cpu>(&topology, 1, &l, &a, forged, timeout).err()
    });
    let err = connect_tcp::<Cpu>(&topology, 0, &l0, &addrs, key(), timeout)
        .err()
        .expect("rank 0 waited for a real rank 1 and timed out");
    assert!(format!("{err:#}").contains("did not connect"), "{err:#}");
    let refused = impostor.join().unwrap().expect("the impostor got in");
    let msg = format!("{refused:#}");
    assert!(
        msg.contains("does not hold this job's token") || msg.contains("refused"),
        "{msg}"
    );
}

/// A peer that joined properly but then sends garbage, an absurd length or a cut frame: the
/// step fails with an error naming it, within the timeout, without allocating what the frame
/// claims and without panicking.
#[test]
fn malformed_frames_from_a_peer_are_errors_that_name_it() {
    use std::io::Write;
    let topology = Topology {
        replicas: 1,
        columns_per_worker: 1,
        elastic: None,
    };
    let header = |seq: u64, count: u32| {
        let mut h = Vec::new();
        h.extend_from_slice(b"AXF1");
        h.extend_from_slice(&seq.to_le_bytes());
        h.extend_from_slice(&count.to_le_bytes());
        h
    };
    // The first block due: rank 1's half of pool2 for one sample.
    let first_block = (column_bytes_per_step(&net_cfg(), 1).unwrap().forward[0] / 4) as u32;
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("garbage", vec![0x5a; 64], "malformed frame header"),
        (
            "absurd length",
            header(0, u32::MAX),
            "4294967295 values where",
        ),
        (
            "replayed or skipped block",
            header(7, 4),
            "block 7 where block 0 was due",
        ),
        (
            "cut frame",
            [header(0, first_block), vec![0u8; first_block as usize * 2]].concat(),
            "closed the connection",
        ),
    ];
    for (what, bytes, expect) in cases {
        let l0 = TcpListener::bind("127.0.0.1:0").unwrap();
        let l1 = TcpListener::bind("127.0.0.1:0").unwrap();
        let addrs: BTreeMap<usize, String> = [
            (0, l0.local_addr().unwrap().to_string()),
            (1, l1.local_addr().unwrap().to_string()),
        ]
        .into();
        let a1 = addrs.clone();
        let bad = std::thread::spawn(move || {
            let mut links =
                alexnet::comm::TcpMesh::connect(1, &l1, &a1, &[0], key(), Duration::from_secs(5))
                    .unwrap();
            let mut stream = links.remove(&0).unwrap().into_stream();
            let _ = stream.write_all(&bytes);
            std::thread::sleep(Duration::from_millis(300));
            drop(stream);
        });
        let ex =
            connect_tcp::<Cpu>(&topology, 0, &l0, &addrs, key(), Duration::from_secs(3)).unwrap();
        let mut net = Network::new(net_cfg(), Cpu::new(), ex.columns, 1).unwrap();
        let t = Instant::now();
        let err = train_step(&mut net, &random(3 * 63 * 63, 1), &[0], 0, &SGD).unwrap_err();
        let msg = format!("{err:#}");
        assert!(msg.contains("rank 1"), "{what}: {msg}");
        assert!(msg.contains(expect), "{what}: {msg}");
        assert!(t.elapsed() < Duration::from_secs(10), "{what}");
        bad.join().unwrap();
    }
}
