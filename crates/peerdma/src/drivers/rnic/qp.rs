//! Completion queues and reliable-connected queue pairs: the state machine and the
//! data path (rxe_req.c, rxe_resp.c, rxe_comp.c), run at post time.

use std::collections::VecDeque;
use std::fmt;

use crate::drivers::rnic::mr::AccessFault;
use crate::drivers::rnic::Mr;
use crate::drivers::rnic::{bump, Access, Pd, Rnic, RnicError};
use crate::errno::Errno;
use crate::sync::{order, Arc, OrderedMutex, Weak};

/// One scatter-gather element of a work request (`ibv_sge`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sge {
    /// The I/O virtual address in the MR.
    pub addr: u64,
    /// Bytes.
    pub len: u32,
    /// The MR's local key.
    pub lkey: u32,
}

/// What a send work request does (`ibv_wr_opcode`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SendOp {
    /// SEND: consumes a receive at the peer.
    Send,
    /// RDMA WRITE to `remote_addr` under `rkey`.
    Write {
        /// The peer's address.
        remote_addr: u64,
        /// The peer's key.
        rkey: u32,
    },
    /// RDMA READ from `remote_addr` under `rkey` into the local SGEs.
    Read {
        /// The peer's address.
        remote_addr: u64,
        /// The peer's key.
        rkey: u32,
    },
    /// 8-byte compare-and-swap; the old value lands in the local SGE.
    CompSwap {
        /// The peer's address (8-byte aligned).
        remote_addr: u64,
        /// The peer's key.
        rkey: u32,
        /// Compared with the remote value.
        compare: u64,
        /// Stored when equal.
        swap: u64,
    },
    /// 8-byte fetch-and-add; the old value lands in the local SGE.
    FetchAdd {
        /// The peer's address (8-byte aligned).
        remote_addr: u64,
        /// The peer's key.
        rkey: u32,
        /// Added.
        add: u64,
    },
}

/// A send work request (`ibv_send_wr`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SendWr {
    /// The caller's id, returned in the completion.
    pub wr_id: u64,
    /// What it does.
    pub op: SendOp,
    /// Local memory: the data to send or write, or where read data and atomic results
    /// land.
    pub sg: Vec<Sge>,
    /// Whether a successful completion is reported (errors always are).
    pub signaled: bool,
}

/// A receive work request (`ibv_recv_wr`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecvWr {
    /// The caller's id.
    pub wr_id: u64,
    /// Where a received message lands.
    pub sg: Vec<Sge>,
}

/// A work completion's status (`ibv_wc_status`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum WcStatus {
    /// Done.
    Success,
    /// A receive buffer too small for the message.
    LocLenErr,
    /// A local key, PD, right or range does not allow the access.
    LocProtErr,
    /// The QP was in error: flushed without running.
    WrFlushErr,
    /// The peer found the request invalid (misaligned atomic, message too long).
    RemInvReqErr,
    /// The peer's key, PD, right or range refused it, or its memory faulted.
    RemAccessErr,
    /// The peer could not complete the operation (its receive buffer faulted).
    RemOpErr,
    /// No receive was posted at the peer.
    RnrRetryExcErr,
    /// The peer is gone.
    RetryExcErr,
}

/// What completed (`ibv_wc_opcode`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum WcOpcode {
    /// A SEND.
    Send,
    /// An RDMA WRITE.
    RdmaWrite,
    /// An RDMA READ.
    RdmaRead,
    /// A compare-and-swap.
    CompSwap,
    /// A fetch-and-add.
    FetchAdd,
    /// A receive.
    Recv,
}

/// A work completion (`ibv_wc`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Wc {
    /// The request's id.
    pub wr_id: u64,
    /// How it ended.
    pub status: WcStatus,
    /// What it was.
    pub opcode: WcOpcode,
    /// Bytes received (receives) or transferred.
    pub byte_len: u32,
    /// The QP.
    pub qp_num: u32,
}

/// A completion queue (`ibv_cq`).
///
/// # Invariants
/// Completions come out in the order they were added.
pub struct Cq {
    /// Lock order: a leaf.
    q: OrderedMutex<VecDeque<Wc>>,
}

impl fmt::Debug for Cq {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Cq")
            .field("pending", &self.q.lock().len())
            .finish()
    }
}

impl Cq {
    pub(crate) fn new() -> Arc<Cq> {
        Arc::new(Cq {
            q: OrderedMutex::new(&order::LEAF, VecDeque::new()),
        })
    }
    fn push(&self, wc: Wc) {
        self.q.lock().push_back(wc);
    }
    /// `ibv_poll_cq`: up to `max` completions, oldest first.
    pub fn poll(&self, max: usize) -> Vec<Wc> {
        let mut q = self.q.lock();
        let n = max.min(q.len());
        q.drain(..n).collect()
    }
    /// Completions waiting.
    pub fn len(&self) -> usize {
        self.q.lock().len()
    }
    /// Whether none is waiting.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A QP's state (`ibv_qp_state`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum QpState {
    /// Just created or reset.
    Reset,
    /// Initialised: receives may be posted.
    Init,
    /// Ready to receive: connected to its peer.
    Rtr,
    /// Ready to send.
    Rts,
    /// In error: every request completes with WR_FLUSH_ERR.
    Err,
}

struct QpInner {
    state: QpState,
    remote: Option<Weak<Qp>>,
    rq: VecDeque<RecvWr>,
}

/// A reliable-connected queue pair (`ibv_qp`).
///
/// # Invariants
/// Receives wait in `rq` only while the QP is in INIT, RTR or RTS.
pub struct Qp {
    qpn: u32,
    dev: crate::addr::Bdf,
    pd: Pd,
    nic: Weak<Rnic>,
    send_cq: Arc<Cq>,
    recv_cq: Arc<Cq>,
    /// Lock order: a leaf, never held across DMA.
    inner: OrderedMutex<QpInner>,
}

impl fmt::Debug for Qp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Qp")
            .field("qpn", &self.qpn)
            .field("state", &self.state())
            .finish()
    }
}

/// How a request failed, and what each side sees.
struct Failure {
    status: WcStatus,
    /// Whether the responder's QP moves to error too.
    responder_error: bool,
    why: String,
}

impl Failure {
    fn local(f: AccessFault) -> Failure {
        Failure {
            status: WcStatus::LocProtErr,
            responder_error: false,
            why: f.why().to_string(),
        }
    }
    fn remote(status: WcStatus, why: impl Into<String>) -> Failure {
        Failure {
            status,
            responder_error: true,
            why: why.into(),
        }
    }
}

impl Qp {
    pub(crate) fn new(
        nic: &Arc<Rnic>,
        qpn: u32,
        pd: Pd,
        send_cq: &Arc<Cq>,
        recv_cq: &Arc<Cq>,
    ) -> Arc<Qp> {
        Arc::new(Qp {
            qpn,
            dev: nic.bdf,
            pd,
            nic: Arc::downgrade(nic),
            send_cq: send_cq.clone(),
            recv_cq: recv_cq.clone(),
            inner: OrderedMutex::new(
                &order::LEAF,
                QpInner {
                    state: QpState::Reset,
                    remote: None,
                    rq: VecDeque::new(),
                },
            ),
        })
    }

    /// Its number.
    pub fn qpn(&self) -> u32 {
        self.qpn
    }
    /// Its PD.
    pub fn pd(&self) -> Pd {
        self.pd
    }
    /// Its state.
    pub fn state(&self) -> QpState {
        self.inner.lock().state
    }

    fn nic(&self, op: &'static str) -> Result<Arc<Rnic>, RnicError> {
        let nic = self.nic.upgrade().ok_or(RnicError {
            dev: self.dev,
            op,
            errno: Errno::ENODEV,
            why: "the NIC is gone".into(),
        })?;
        nic.check_alive(op)?;
        Ok(nic)
    }

    /// `ibv_modify_qp` to `to`; `remote` (the peer's QP) is needed for RTR. EINVAL
    /// for a transition the state machine does not have (RESET→RTS, INIT→RTS, ...).
    /// Moving to ERR flushes the posted receives; to RESET drops them.
    pub fn modify(&self, to: QpState, remote: Option<&Arc<Qp>>) -> Result<(), RnicError> {
        let op = "modify_qp";
        let nic = self.nic(op)?;
        let mut inner = self.inner.lock();
        use QpState as S;
        let ok = matches!(
            (inner.state, to),
            (S::Reset, S::Init)
                | (S::Init, S::Init)
                | (S::Init, S::Rtr)
                | (S::Rtr, S::Rts)
                | (S::Rts, S::Rts)
                | (_, S::Err)
                | (_, S::Reset)
        );
        if !ok {
            return Err(nic.err(
                op,
                Errno::EINVAL,
                format!("no transition from {:?} to {:?}", inner.state, to),
            ));
        }
        if to == S::Rtr {
            let Some(r) = remote else {
                return Err(nic.err(op, Errno::EINVAL, "RTR needs the remote QP"));
            };
            inner.remote = Some(Arc::downgrade(r));
        }
        inner.state = to;
        match to {
            S::Err => {
                let flushed: Vec<RecvWr> = inner.rq.drain(..).collect();
                drop(inner);
                self.flush_recvs(&nic, flushed);
            }
            S::Reset => {
                inner.rq.clear();
                inner.remote = None;
            }
            _ => {}
        }
        Ok(())
    }

    fn flush_recvs(&self, nic: &Rnic, wrs: Vec<RecvWr>) {
        for wr in wrs {
            bump(&nic.counters.wc_errors, 1);
            self.recv_cq.push(Wc {
                wr_id: wr.wr_id,
                status: WcStatus::WrFlushErr,
                opcode: WcOpcode::Recv,
                byte_len: 0,
                qp_num: self.qpn,
            });
        }
    }

    /// Moves to the error state (a failed request, the NIC's removal).
    pub(crate) fn to_error(&self) {
        let mut inner = self.inner.lock();
        inner.state = QpState::Err;
        let flushed: Vec<RecvWr> = inner.rq.drain(..).collect();
        drop(inner);
        if let Some(nic) = self.nic.upgrade() {
            self.flush_recvs(&nic, flushed);
        }
    }

    /// Destroyed with its context: pending receives are dropped, the peer is cut.
    pub(crate) fn destroy(&self) {
        let mut inner = self.inner.lock();
        inner.state = QpState::Err;
        inner.rq.clear();
        inner.remote = None;
    }

    /// `ibv_post_recv`. EINVAL in RESET; in ERR the request completes at once with
    /// WR_FLUSH_ERR.
    pub fn post_recv(&self, wr: RecvWr) -> Result<(), RnicError> {
        let op = "post_recv";
        let nic = self.nic(op)?;
        let mut inner = self.inner.lock();
        match inner.state {
            QpState::Reset => Err(nic.err(op, Errno::EINVAL, "the QP is in RESET")),
            QpState::Err => {
                drop(inner);
                self.flush_recvs(&nic, vec![wr]);
                Ok(())
            }
            _ => {
                inner.rq.push_back(wr);
                Ok(())
            }
        }
    }

    /// `ibv_post_send`: runs the request now. EINVAL before RTS; in ERR it completes
    /// with WR_FLUSH_ERR. A failure completes with its status (LOC_PROT_ERR for a bad
    /// local SGE, REM_ACCESS_ERR for a remote key, right, range or memory fault,
    /// REM_INV_REQ_ERR for a misaligned atomic or a message too long, RNR_RETRY_EXC_ERR
    /// when the peer has no receive posted) and moves the QP to ERR — and the peer's,
    /// for remote errors.
    pub fn post_send(&self, wr: SendWr) -> Result<(), RnicError> {
        let op = "post_send";
        let nic = self.nic(op)?;
        let (state, remote) = {
            let inner = self.inner.lock();
            (inner.state, inner.remote.as_ref().and_then(Weak::upgrade))
        };
        let opcode = match wr.op {
            SendOp::Send => WcOpcode::Send,
            SendOp::Write { .. } => WcOpcode::RdmaWrite,
            SendOp::Read { .. } => WcOpcode::RdmaRead,
            SendOp::CompSwap { .. } => WcOpcode::CompSwap,
            SendOp::FetchAdd { .. } => WcOpcode::FetchAdd,
        };
        match state {
            QpState::Rts => {}
            QpState::Err => {
                bump(&nic.counters.wc_errors, 1);
                self.send_cq.push(Wc {
                    wr_id: wr.wr_id,
                    status: WcStatus::WrFlushErr,
                    opcode,
                    byte_len: 0,
                    qp_num: self.qpn,
                });
                return Ok(());
            }
            s => return Err(nic.err(op, Errno::EINVAL, format!("the QP is in {s:?}, not RTS"))),
        }
        let result = match remote {
            Some(r) if r.state() != QpState::Reset => self.execute(&nic, &r, &wr),
            _ => Err(Failure::remote(
                WcStatus::RetryExcErr,
                "the peer QP is gone",
            )),
        };
        match result {
            Ok(bytes) => {
                if wr.signaled {
                    self.send_cq.push(Wc {
                        wr_id: wr.wr_id,
                        status: WcStatus::Success,
                        opcode,
                        byte_len: bytes as u32,
                        qp_num: self.qpn,
                    });
                }
            }
            Err(f) => {
                tracing::debug!(qpn = self.qpn, status = ?f.status, why = %f.why, "rnic: request failed");
                bump(&nic.counters.wc_errors, 1);
                self.send_cq.push(Wc {
                    wr_id: wr.wr_id,
                    status: f.status,
                    opcode,
                    byte_len: 0,
                    qp_num: self.qpn,
                });
                self.to_error();
                if f.responder_error {
                    if let Some(r) = self.inner.lock().remote.as_ref().and_then(Weak::upgrade) {
                        r.to_error();
                    }
                }
            }
        }
        Ok(())
    }

    /// Runs one request against the responder `r`; the bytes moved. Data moves a packet
    /// at a time through a bounce buffer: the requester NIC reads a packet from its
    /// memory by DMA, the responder NIC writes it into its own (or the other way for a
    /// READ), as on the wire.
    fn execute(&self, nic: &Rnic, r: &Arc<Qp>, wr: &SendWr) -> Result<usize, Failure> {
        let rnic = r
            .nic
            .upgrade()
            .filter(|n| !n.removed.load(crate::sync::atomic::Ordering::SeqCst))
            .ok_or_else(|| Failure::remote(WcStatus::RetryExcErr, "the peer NIC is gone"))?;
        let rkey_mr = |rkey: u32| {
            rnic.lookup_mr(rkey).ok_or_else(|| {
                Failure::remote(
                    WcStatus::RemAccessErr,
                    format!("the peer has no MR with rkey {rkey:#x}"),
                )
            })
        };
        let remote_fault =
            |f: AccessFault| Failure::remote(WcStatus::RemAccessErr, f.why().to_string());
        match wr.op {
            SendOp::Send => {
                let local =
                    Local::resolve(nic, self.pd, &wr.sg, Access::NONE).map_err(Failure::local)?;
                let recv = r.inner.lock().rq.pop_front();
                let Some(recv) = recv else {
                    return Err(Failure {
                        status: WcStatus::RnrRetryExcErr,
                        responder_error: false,
                        why: "no receive posted at the peer".into(),
                    });
                };
                let total = local.total;
                let room: u64 = recv.sg.iter().map(|s| u64::from(s.len)).sum();
                let complete = |status: WcStatus, len: u64| {
                    if status != WcStatus::Success {
                        bump(&rnic.counters.wc_errors, 1);
                    }
                    r.recv_cq.push(Wc {
                        wr_id: recv.wr_id,
                        status,
                        opcode: WcOpcode::Recv,
                        byte_len: len as u32,
                        qp_num: r.qpn,
                    });
                };
                if total > room {
                    complete(WcStatus::LocLenErr, 0);
                    return Err(Failure::remote(
                        WcStatus::RemInvReqErr,
                        "the message is longer than the receive buffer",
                    ));
                }
                let target = match Local::resolve(&rnic, r.pd, &recv.sg, Access::LOCAL_WRITE) {
                    Ok(t) => t,
                    Err(f) => {
                        complete(WcStatus::LocProtErr, 0);
                        return Err(Failure::remote(WcStatus::RemOpErr, f.why().to_string()));
                    }
                };
                let moved = packets(total, |off, pkt| {
                    local.copy(nic, off, pkt, false).map_err(Failure::local)?;
                    target
                        .copy(&rnic, off, pkt, true)
                        .map_err(|f| Failure::remote(WcStatus::RemOpErr, f.why().to_string()))
                });
                match &moved {
                    Ok(()) => complete(WcStatus::Success, total),
                    Err(f) if f.status == WcStatus::RemOpErr => complete(WcStatus::LocProtErr, 0),
                    Err(_) => complete(WcStatus::WrFlushErr, 0),
                }
                moved?;
                bump(&nic.counters.bytes_out, total);
                bump(&rnic.counters.bytes_in, total);
                Ok(total as usize)
            }
            SendOp::Write { remote_addr, rkey } => {
                let local =
                    Local::resolve(nic, self.pd, &wr.sg, Access::NONE).map_err(Failure::local)?;
                let total = local.total;
                let mr = rkey_mr(rkey)?;
                mr.check(r.pd, remote_addr, total, Access::REMOTE_WRITE)
                    .map_err(remote_fault)?;
                packets(total, |off, pkt| {
                    local.copy(nic, off, pkt, false).map_err(Failure::local)?;
                    mr.transfer(
                        &rnic,
                        remote_addr + off,
                        pkt.len() as u64,
                        true,
                        |reg, p, o, b, n| reg.write_span(p, o, &pkt[b..b + n]),
                    )
                    .map_err(remote_fault)
                })?;
                bump(&nic.counters.bytes_out, total);
                bump(&rnic.counters.bytes_in, total);
                Ok(total as usize)
            }
            SendOp::Read { remote_addr, rkey } => {
                let local = Local::resolve(nic, self.pd, &wr.sg, Access::LOCAL_WRITE)
                    .map_err(Failure::local)?;
                let total = local.total;
                let mr = rkey_mr(rkey)?;
                mr.check(r.pd, remote_addr, total, Access::REMOTE_READ)
                    .map_err(remote_fault)?;
                packets(total, |off, pkt| {
                    mr.transfer(
                        &rnic,
                        remote_addr + off,
                        pkt.len() as u64,
                        false,
                        |reg, p, o, b, n| reg.read_span(p, o, &mut pkt[b..b + n]),
                    )
                    .map_err(remote_fault)?;
                    local.copy(nic, off, pkt, true).map_err(Failure::local)
                })?;
                bump(&rnic.counters.bytes_out, total);
                bump(&nic.counters.bytes_in, total);
                Ok(total as usize)
            }
            SendOp::CompSwap {
                remote_addr, rkey, ..
            }
            | SendOp::FetchAdd {
                remote_addr, rkey, ..
            } => {
                if wr.sg.len() != 1 || wr.sg[0].len != 8 {
                    return Err(Failure::local(AccessFault::Protection(
                        "an atomic needs one 8-byte local SGE".into(),
                    )));
                }
                let local = Local::resolve(nic, self.pd, &wr.sg, Access::LOCAL_WRITE)
                    .map_err(Failure::local)?;
                if remote_addr % 8 != 0 {
                    return Err(Failure::remote(
                        WcStatus::RemInvReqErr,
                        "the atomic's address is not 8-byte aligned",
                    ));
                }
                let mr = rkey_mr(rkey)?;
                mr.check(r.pd, remote_addr, 8, Access::REMOTE_ATOMIC)
                    .map_err(remote_fault)?;
                let mut old = [0u8; 8];
                {
                    let _unit = rnic.atomic.lock();
                    mr.transfer(&rnic, remote_addr, 8, true, |reg, p, off, b, n| {
                        reg.read_span(p, off, &mut old[b..b + n]);
                        // One run: an aligned 8-byte word never crosses a page.
                        let cur = u64::from_le_bytes(old);
                        let new = match wr.op {
                            SendOp::CompSwap { compare, swap, .. } => {
                                if cur == compare {
                                    swap
                                } else {
                                    cur
                                }
                            }
                            SendOp::FetchAdd { add, .. } => cur.wrapping_add(add),
                            _ => cur,
                        };
                        reg.write_span(p, off, &new.to_le_bytes()[b..b + n]);
                    })
                    .map_err(remote_fault)?;
                }
                local.copy(nic, 0, &mut old, true).map_err(Failure::local)?;
                bump(&nic.counters.bytes_in, 8);
                Ok(8)
            }
        }
    }
}

/// Bytes a request moves per packet through the bounce buffer.
const PACKET: usize = 64 << 10;

/// Calls `f(offset, packet)` for each packet of a `total`-byte message, in order,
/// stopping at the first error. The bounce buffer is the request's own (under shuttle
/// every task shares one OS thread, so a thread-local buffer would be shared).
fn packets(
    total: u64,
    mut f: impl FnMut(u64, &mut [u8]) -> Result<(), Failure>,
) -> Result<(), Failure> {
    let mut b = vec![0u8; total.min(PACKET as u64) as usize];
    let mut off = 0u64;
    while off < total {
        let n = (total - off).min(PACKET as u64) as usize;
        f(off, &mut b[..n])?;
        off += n as u64;
    }
    Ok(())
}

/// A request's local SGEs, each resolved to its MR and checked (key, PD, right,
/// range) before any byte moves.
struct Local {
    pieces: Vec<(Arc<Mr>, u64, u64)>,
    total: u64,
}

impl Local {
    fn resolve(nic: &Rnic, pd: Pd, sg: &[Sge], need: Access) -> Result<Local, AccessFault> {
        let mut pieces = Vec::with_capacity(sg.len());
        let mut total = 0;
        for s in sg {
            let mr = nic
                .lookup_mr(s.lkey)
                .ok_or_else(|| AccessFault::Protection(format!("no MR with lkey {:#x}", s.lkey)))?;
            mr.check(pd, s.addr, u64::from(s.len), need)?;
            pieces.push((mr, s.addr, u64::from(s.len)));
            total += u64::from(s.len);
        }
        Ok(Local { pieces, total })
    }

    /// Moves `buf.len()` bytes at message offset `off` between the SGEs' memory and
    /// `buf`: into memory when `to_mem`, out of it otherwise.
    fn copy(&self, nic: &Rnic, off: u64, buf: &mut [u8], to_mem: bool) -> Result<(), AccessFault> {
        let end = off + buf.len() as u64;
        let mut base = 0u64;
        for (mr, iova, len) in &self.pieces {
            let start = base;
            base += len;
            let (lo, hi) = (start.max(off), base.min(end));
            if lo >= hi {
                continue;
            }
            let at = (lo - off) as usize;
            let piece = &mut buf[at..at + (hi - lo) as usize];
            mr.transfer(
                nic,
                iova + (lo - start),
                hi - lo,
                to_mem,
                |r, p, o, b, n| {
                    if to_mem {
                        r.write_span(p, o, &piece[b..b + n])
                    } else {
                        r.read_span(p, o, &mut piece[b..b + n])
                    }
                },
            )?;
        }
        Ok(())
    }
}
