//! Which locals a suspension point must save: those live after it.
//!
//! The first versions of the transform saved every local of a function at one shared
//! unwind block that every site branched to. That made every local live across every
//! call, which costs twice: at run time the compiler keeps all of them in stack slots
//! around each call, and at compile time the shared block merges N locals from S sites
//! (N x S block arguments). GCC's `cc1` has functions with thousands of each, and
//! Cranelift ran a 24 GiB host out of memory compiling them. A local that every path from
//! a site writes before reading holds nothing the resumed function needs; so each site
//! saves only the locals live after it, in its own unwind branch, where they are live
//! anyway: the instrumented function keeps the original one's liveness.
//!
//! This is the textbook backward dataflow over basic blocks, built here from the
//! structured code. A call or throw inside a `try_table` may also continue at the
//! labels of its catch clauses, so what is live there is live at it.

use super::UnwindError;
use wasmparser::{FunctionBody, Operator};

/// Where a site sits, by operator index.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SitePoint {
    /// A call: what is live once it returns (or throws to a handler in this function).
    Call(usize),
    /// The header of a loop: what is live at the start of its body.
    LoopHeader(usize),
}

/// Bounds on the analysis and on what it asks the emitter to produce, so that a crafted
/// function (tens of thousands of locals live across tens of thousands of calls) ends in
/// a refusal instead of gigabytes of output.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Budget {
    /// Bits of live sets held at once (basic blocks x locals).
    pub max_bits: u64,
    /// Locals saved, summed over the function's sites.
    pub max_saved: u64,
}

#[derive(Clone, Copy)]
enum Event {
    Get(u32),
    Set(u32),
    /// A point that may throw to the block's handlers.
    Throw,
    Site(u32),
}

struct Block {
    start: u32,
    end: u32,
    succs: Vec<u32>,
    /// Index into the handler contexts: the catch labels enclosing the block.
    context: u32,
    throws: bool,
}

enum Kind {
    Function,
    Block,
    Loop,
    If { if_block: u32, had_else: bool },
    TryTable { outer_context: u32 },
}

struct Control {
    kind: Kind,
    /// Where a branch to this label goes (`u32::MAX`: out of the function).
    target: u32,
    after: u32,
}

const EXIT: u32 = u32::MAX;

struct Graph {
    blocks: Vec<Block>,
    events: Vec<Event>,
    /// Catch-label blocks per handler context (context 0 has none).
    contexts: Vec<Vec<u32>>,
}

impl Graph {
    fn alloc(&mut self, context: u32) -> u32 {
        self.blocks.push(Block { start: 0, end: 0, succs: Vec::new(), context, throws: false });
        self.blocks.len() as u32 - 1
    }

    fn start(&mut self, block: u32) {
        let at = self.events.len() as u32;
        self.blocks[block as usize].start = at;
        self.blocks[block as usize].end = at;
    }

    fn finish(&mut self, block: u32) {
        self.blocks[block as usize].end = self.events.len() as u32;
    }

    /// A point of block `block` that may throw to the catch labels of `context`.
    fn may_throw(&mut self, block: u32, context: u32) {
        if context != 0 {
            self.events.push(Event::Throw);
            self.blocks[block as usize].throws = true;
        }
    }

    fn edge(&mut self, from: u32, to: u32) {
        if to != EXIT {
            self.blocks[from as usize].succs.push(to);
        }
    }
}

/// The locals live at each of `sites` (in the order given, each sorted), for a function
/// with `locals` locals (parameters included).
pub(crate) fn live_at_sites(
    body: &FunctionBody<'_>,
    locals: u32,
    sites: &[SitePoint],
    func: u32,
    budget: Budget,
) -> Result<Vec<Vec<u32>>, UnwindError> {
    let graph = build(body, sites, func)?;
    let words = (locals as usize).div_ceil(64);
    let bits = graph.blocks.len() as u64 * words as u64 * 64;
    if bits > budget.max_bits {
        return Err(UnwindError::Unsupported {
            feature: format!(
                "a function this large ({} basic blocks x {locals} locals, over the analysis budget of {} Mbit)",
                graph.blocks.len(),
                budget.max_bits >> 20
            ),
            func: Some(func),
        });
    }
    let live_in = solve(&graph, words);
    let mut result = vec![Vec::new(); sites.len()];
    let mut saved = 0u64;
    let mut live = vec![0u64; words];
    for (b, block) in graph.blocks.iter().enumerate() {
        let events = &graph.events[block.start as usize..block.end as usize];
        if !events.iter().any(|e| matches!(e, Event::Site(_))) {
            continue;
        }
        out_of(&graph, &live_in, b, &mut live);
        for event in events.iter().rev() {
            if let Event::Site(k) = *event {
                let set = ones(&live);
                saved += set.len() as u64;
                if saved > budget.max_saved {
                    return Err(UnwindError::Unsupported {
                        feature: format!(
                            "a function whose suspension points hold over {} live locals in all \
                             (the instrumentation budget)",
                            budget.max_saved
                        ),
                        func: Some(func),
                    });
                }
                result[k as usize] = set;
            } else {
                step(&graph, &live_in, block.context, *event, &mut live);
            }
        }
    }
    Ok(result)
}

fn ones(live: &[u64]) -> Vec<u32> {
    let mut out = Vec::new();
    for (w, &word) in live.iter().enumerate() {
        let mut bits = word;
        while bits != 0 {
            out.push(w as u32 * 64 + bits.trailing_zeros());
            bits &= bits - 1;
        }
    }
    out
}

/// One event backwards.
fn step(graph: &Graph, live_in: &[Vec<u64>], context: u32, event: Event, live: &mut [u64]) {
    match event {
        Event::Get(l) => live[l as usize / 64] |= 1 << (l % 64),
        Event::Set(l) => live[l as usize / 64] &= !(1 << (l % 64)),
        Event::Throw => {
            for &h in &graph.contexts[context as usize] {
                union(live, &live_in[h as usize]);
            }
        }
        Event::Site(_) => {}
    }
}

fn union(into: &mut [u64], from: &[u64]) {
    for (a, b) in into.iter_mut().zip(from) {
        *a |= b;
    }
}

/// What is live at the end of block `b`.
fn out_of(graph: &Graph, live_in: &[Vec<u64>], b: usize, live: &mut [u64]) {
    live.fill(0);
    for &s in &graph.blocks[b].succs {
        union(live, &live_in[s as usize]);
    }
}

/// Live-in sets of every block, by a worklist in reverse block order (blocks are numbered
/// in textual order, so most are final after one visit; loops take a few more).
fn solve(graph: &Graph, words: usize) -> Vec<Vec<u64>> {
    let n = graph.blocks.len();
    let mut preds: Vec<Vec<u32>> = vec![Vec::new(); n];
    for (b, block) in graph.blocks.iter().enumerate() {
        for &s in &block.succs {
            preds[s as usize].push(b as u32);
        }
        if block.throws {
            for &h in &graph.contexts[block.context as usize] {
                preds[h as usize].push(b as u32);
            }
        }
    }
    let mut live_in = vec![vec![0u64; words]; n];
    let mut queued = vec![true; n];
    let mut work: std::collections::VecDeque<u32> = (0..n as u32).rev().collect();
    let mut live = vec![0u64; words];
    while let Some(b) = work.pop_front() {
        let b = b as usize;
        queued[b] = false;
        out_of(graph, &live_in, b, &mut live);
        let block = &graph.blocks[b];
        for event in graph.events[block.start as usize..block.end as usize].iter().rev() {
            step(graph, &live_in, block.context, *event, &mut live);
        }
        if live != live_in[b] {
            live_in[b].copy_from_slice(&live);
            for &p in &preds[b] {
                if !std::mem::replace(&mut queued[p as usize], true) {
                    work.push_back(p);
                }
            }
        }
    }
    live_in
}

fn build(body: &FunctionBody<'_>, sites: &[SitePoint], func: u32) -> Result<Graph, UnwindError> {
    let mut after_call = std::collections::HashMap::new();
    let mut at_header = std::collections::HashMap::new();
    for (k, site) in sites.iter().enumerate() {
        match *site {
            SitePoint::Call(op) => after_call.insert(op, k as u32),
            SitePoint::LoopHeader(op) => at_header.insert(op, k as u32),
        };
    }
    let mut g = Graph { blocks: Vec::new(), events: Vec::new(), contexts: vec![Vec::new()] };
    let mut context = 0u32;
    let mut cur = g.alloc(context);
    g.start(cur);
    let mut ctl = vec![Control { kind: Kind::Function, target: EXIT, after: EXIT }];
    let target = |ctl: &[Control], depth: u32| -> u32 {
        let c = &ctl[ctl.len() - 1 - depth as usize];
        match c.kind {
            Kind::Function => EXIT,
            _ => c.target,
        }
    };
    // Ends the current block with `succs` and starts a fresh one (reached only through
    // them when `fallthrough`, else unreachable).
    fn split(g: &mut Graph, cur: &mut u32, context: u32, succs: &[u32], fallthrough: bool) {
        for &s in succs {
            g.edge(*cur, s);
        }
        g.finish(*cur);
        let next = g.alloc(context);
        if fallthrough {
            g.edge(*cur, next);
        }
        g.start(next);
        *cur = next;
    }
    let mut ops = body.get_operators_reader()?;
    let mut index = 0usize;
    while !ops.eof() {
        let op = ops.read()?;
        match op {
            Operator::LocalGet { local_index } => g.events.push(Event::Get(local_index)),
            Operator::LocalSet { local_index } | Operator::LocalTee { local_index } => {
                g.events.push(Event::Set(local_index))
            }
            Operator::Call { .. } | Operator::CallIndirect { .. } | Operator::CallRef { .. } => {
                if let Some(&k) = after_call.get(&index) {
                    g.events.push(Event::Site(k));
                }
                g.may_throw(cur, context);
            }
            Operator::ReturnCall { .. } | Operator::ReturnCallIndirect { .. } | Operator::ReturnCallRef { .. } => {
                if let Some(&k) = after_call.get(&index) {
                    g.events.push(Event::Site(k));
                }
                g.may_throw(cur, context);
                split(&mut g, &mut cur, context, &[], false);
            }
            Operator::Throw { .. } | Operator::ThrowRef => {
                g.may_throw(cur, context);
                split(&mut g, &mut cur, context, &[], false);
            }
            Operator::Block { .. } => {
                let after = g.alloc(context);
                ctl.push(Control { kind: Kind::Block, target: after, after });
            }
            Operator::Loop { .. } => {
                let after = g.alloc(context);
                let header = g.alloc(context);
                g.edge(cur, header);
                g.finish(cur);
                g.start(header);
                cur = header;
                if let Some(&k) = at_header.get(&index) {
                    g.events.push(Event::Site(k));
                }
                ctl.push(Control { kind: Kind::Loop, target: header, after });
            }
            Operator::If { .. } => {
                let after = g.alloc(context);
                let if_block = cur;
                split(&mut g, &mut cur, context, &[], true);
                ctl.push(Control { kind: Kind::If { if_block, had_else: false }, target: after, after });
            }
            Operator::Else => {
                let top = ctl.last_mut().expect("else inside if");
                let Kind::If { if_block, ref mut had_else } = top.kind else { unreachable!("validated") };
                *had_else = true;
                let after = top.after;
                g.edge(cur, after);
                g.finish(cur);
                let else_block = g.alloc(context);
                g.edge(if_block, else_block);
                g.start(else_block);
                cur = else_block;
            }
            Operator::TryTable { try_table } => {
                let mut handlers = g.contexts[context as usize].clone();
                for catch in &try_table.catches {
                    let label = match *catch {
                        wasmparser::Catch::One { label, .. }
                        | wasmparser::Catch::OneRef { label, .. }
                        | wasmparser::Catch::All { label }
                        | wasmparser::Catch::AllRef { label } => label,
                    };
                    let t = target(&ctl, label);
                    if t != EXIT && !handlers.contains(&t) {
                        handlers.push(t);
                    }
                }
                let after = g.alloc(context);
                let outer_context = context;
                g.contexts.push(handlers);
                context = g.contexts.len() as u32 - 1;
                split(&mut g, &mut cur, context, &[], true);
                ctl.push(Control { kind: Kind::TryTable { outer_context }, target: after, after });
            }
            Operator::End => {
                let top = ctl.pop().expect("balanced");
                match top.kind {
                    Kind::Function => g.finish(cur),
                    kind => {
                        g.edge(cur, top.after);
                        g.finish(cur);
                        match kind {
                            Kind::If { if_block, had_else: false } => g.edge(if_block, top.after),
                            Kind::TryTable { outer_context } => context = outer_context,
                            _ => {}
                        }
                        g.start(top.after);
                        cur = top.after;
                    }
                }
            }
            Operator::Br { relative_depth } => {
                let t = target(&ctl, relative_depth);
                split(&mut g, &mut cur, context, &[t], false);
            }
            Operator::BrIf { relative_depth }
            | Operator::BrOnNull { relative_depth }
            | Operator::BrOnNonNull { relative_depth }
            | Operator::BrOnCast { relative_depth, .. }
            | Operator::BrOnCastFail { relative_depth, .. } => {
                let t = target(&ctl, relative_depth);
                split(&mut g, &mut cur, context, &[t], true);
            }
            Operator::BrTable { targets } => {
                let mut succs = vec![target(&ctl, targets.default())];
                for depth in targets.targets() {
                    succs.push(target(&ctl, depth?));
                }
                succs.sort_unstable();
                succs.dedup();
                split(&mut g, &mut cur, context, &succs, false);
            }
            Operator::Return | Operator::Unreachable => split(&mut g, &mut cur, context, &[], false),
            Operator::Try { .. }
            | Operator::Catch { .. }
            | Operator::CatchAll
            | Operator::Delegate { .. }
            | Operator::Rethrow { .. } => {
                return Err(UnwindError::Unsupported {
                    feature: "legacy exception handling (`try`/`catch`/`delegate`)".into(),
                    func: Some(func),
                });
            }
            _ => {}
        }
        index += 1;
    }
    Ok(g)
}

#[cfg(test)]
mod tests {
    use super::*;

    const BUDGET: Budget = Budget { max_bits: 1 << 30, max_saved: 1 << 20 };

    /// The live sets at every call and loop header of the single function in `wat`.
    fn live(wat: &str) -> Vec<Vec<u32>> {
        let wasm = wat::parse_str(wat).unwrap();
        for payload in wasmparser::Parser::new(0).parse_all(&wasm) {
            if let wasmparser::Payload::CodeSectionEntry(body) = payload.unwrap() {
                let mut sites = Vec::new();
                let mut ops = body.get_operators_reader().unwrap();
                let mut index = 0;
                while !ops.eof() {
                    match ops.read().unwrap() {
                        Operator::Call { .. } => sites.push(SitePoint::Call(index)),
                        Operator::Loop { .. } => sites.push(SitePoint::LoopHeader(index)),
                        _ => {}
                    }
                    index += 1;
                }
                return live_at_sites(&body, 8, &sites, 0, BUDGET).unwrap();
            }
        }
        panic!("no function")
    }

    #[test]
    fn a_local_written_before_its_next_read_is_dead() {
        let sets = live(
            r#"(module (func $f (param i32)
                 (local i32 i32)
                 (local.set 1 (i32.const 1))
                 (call $f (local.get 0))           ;; 0 and 1 read below; 2 written first
                 (local.set 2 (local.get 1))
                 (call $f (local.get 0))           ;; 0 and 1 are dead now, 2 read
                 (local.set 1 (local.get 2))
                 (call $f (local.get 1))))"#,
        );
        assert_eq!(sets, vec![vec![0, 1], vec![2], vec![]]);
    }

    #[test]
    fn loops_carry_what_the_next_iteration_reads() {
        let sets = live(
            r#"(module (func $f (param i32)
                 (local i32 i32)
                 (loop $l
                   (call $f (local.get 1))
                   (local.set 1 (i32.add (local.get 1) (local.get 2)))
                   (br_if $l (local.get 0)))
                 (local.set 2 (i32.const 0))))"#,
        );
        // At the header and after the call: 0, 1, 2 (the loop reads them all again).
        assert_eq!(sets, vec![vec![0, 1, 2], vec![0, 1, 2]]);
    }

    #[test]
    fn branches_and_ifs_join_their_paths() {
        let sets = live(
            r#"(module (func $f (param i32)
                 (local i32 i32 i32)
                 (block $out
                   (call $f (i32.const 0))
                   (br_if $out (local.get 0))
                   (local.set 3 (local.get 1)))
                 (if (local.get 0)
                   (then (call $f (local.get 3)))
                   (else (call $f (local.get 2))))))"#,
        );
        assert_eq!(sets, vec![vec![0, 1, 2, 3], vec![], vec![]]);
    }

    #[test]
    fn a_catch_label_is_live_at_every_call_inside_its_try() {
        let sets = live(
            r#"(module (tag $e) (func $f (param i32)
                 (local i32 i32)
                 (block $handler
                   (try_table (catch $e $handler)
                     (call $f (i32.const 0))       ;; the handler reads 1 (old value)
                     (call $f (i32.const 1))       ;; ... and this call can throw too
                     (local.set 1 (i32.const 5))
                     (call $f (i32.const 2)))      ;; the handler reads the new 1
                   (return))
                 (call $f (local.get 1))))"#,
        );
        assert_eq!(sets, vec![vec![1], vec![1], vec![1], vec![]]);
    }

    #[test]
    fn the_budget_refuses_a_function_with_too_much_live_at_its_sites() {
        let wasm = wat::parse_str(
            r#"(module (func $f (param i32)
                 (local i32 i32 i32)
                 (call $f (i32.const 0)) (call $f (i32.const 0))
                 (drop (i32.add (local.get 1) (i32.add (local.get 2) (local.get 3))))))"#,
        )
        .unwrap();
        for payload in wasmparser::Parser::new(0).parse_all(&wasm) {
            if let wasmparser::Payload::CodeSectionEntry(body) = payload.unwrap() {
                let sites = [SitePoint::Call(1), SitePoint::Call(3)];
                let ok = live_at_sites(&body, 4, &sites, 0, Budget { max_bits: 1 << 20, max_saved: 6 }).unwrap();
                assert_eq!(ok, vec![vec![1, 2, 3], vec![1, 2, 3]]);
                let err = live_at_sites(&body, 4, &sites, 0, Budget { max_bits: 1 << 20, max_saved: 5 }).unwrap_err();
                assert!(err.to_string().contains("budget"), "{err}");
                let err = live_at_sites(&body, 4, &sites, 0, Budget { max_bits: 32, max_saved: 100 }).unwrap_err();
                assert!(err.to_string().contains("basic blocks"), "{err}");
            }
        }
    }
}
