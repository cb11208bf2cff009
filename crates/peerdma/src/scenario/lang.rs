//! The scenario text format (docs/scenario.md): one statement per line, words and
//! `key=value` arguments, `expect` clauses, `parallel NAME {` ... `}` groups and
//! `include "file"`. This module only turns text into statements with positions; what a
//! verb means and which arguments it takes belongs to the step vocabulary
//! ([`super::vocab`]), so a new device model adds words without touching the grammar.
//!
//! Each line is parsed by a winnow grammar; lines are joined into blocks afterwards.
//! Every error carries the file, line and column of the offending text.

use std::path::{Path, PathBuf};

use winnow::ascii::{space0, space1};
use winnow::combinator::{alt, cut_err, delimited, eof, opt, preceded, repeat, terminated};
use winnow::error::{ContextError, ErrMode, StrContext, StrContextValue};
use winnow::stream::{LocatingSlice, Stream};
use winnow::token::{one_of, take_till, take_while};
use winnow::{ModalResult, Parser};

/// Scenario files larger than this are refused before they are read whole.
pub const MAX_SOURCE_BYTES: u64 = 4 << 20;
/// Deepest chain of `include`s.
pub const MAX_INCLUDE_DEPTH: usize = 16;

/// Where a piece of text is: a file of the scenario's [`Sources`], a 1-based line, a
/// 1-based column (in characters) and a length in characters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Span {
    /// Index into [`Sources::files`].
    pub file: u16,
    /// Line, from 1.
    pub line: u32,
    /// Column, from 1.
    pub col: u32,
    /// Characters covered (at least 1 when rendered).
    pub len: u32,
}

/// A word of the text and where it stands.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tok {
    /// The text, quotes removed for a quoted string.
    pub text: String,
    /// Its position.
    pub span: Span,
}

/// One argument: a bare value or `key=value`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Arg {
    /// The key of a `key=value` argument.
    pub key: Option<Tok>,
    /// The value.
    pub value: Tok,
}

/// A comparison in an `expect` clause.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    /// `=`
    Eq,
    /// `!=`
    Ne,
    /// `>=`
    Ge,
    /// `<=`
    Le,
    /// `>`
    Gt,
    /// `<`
    Lt,
}

impl Op {
    /// Whether `a op b`.
    pub fn holds(self, a: u64, b: u64) -> bool {
        match self {
            Op::Eq => a == b,
            Op::Ne => a != b,
            Op::Ge => a >= b,
            Op::Le => a <= b,
            Op::Gt => a > b,
            Op::Lt => a < b,
        }
    }

    /// As written.
    pub fn as_str(self) -> &'static str {
        match self {
            Op::Eq => "=",
            Op::Ne => "!=",
            Op::Ge => ">=",
            Op::Le => "<=",
            Op::Gt => ">",
            Op::Lt => "<",
        }
    }
}

/// One check of an `expect` clause: `ok`, an errno name, `error`, or `key OP value`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Check {
    /// The key or the bare word.
    pub key: Tok,
    /// The comparison and its right side, when there is one.
    pub cmp: Option<(Op, Tok)>,
}

/// An operation line: `[actor:] [name =] verb args... [expect checks...]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Call {
    /// The process the step runs in, when it runs in one.
    pub actor: Option<Tok>,
    /// The name the step's result is bound to.
    pub bind: Option<Tok>,
    /// The operation.
    pub verb: Tok,
    /// Its arguments in order.
    pub args: Vec<Arg>,
    /// What must hold afterwards; empty means "succeeds".
    pub checks: Vec<Check>,
}

/// A statement and the line it came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Stmt {
    /// The whole statement's position (its first word, to the end of the line).
    pub span: Span,
    /// What it says.
    pub kind: StmtKind,
}

/// The kinds of statement.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StmtKind {
    /// An operation.
    Call(Call),
    /// `expect checks...` on its own line: counters of the whole host.
    Expect(Vec<Check>),
    /// `parallel NAME {` ... `}`: the steps inside run concurrently.
    Parallel {
        /// The group's name.
        name: Tok,
        /// Its statements.
        body: Vec<Stmt>,
    },
}

/// One source file of a scenario.
#[derive(Clone, Debug)]
pub struct SourceFile {
    /// The name errors print.
    pub path: String,
    /// The text.
    pub text: String,
}

/// The files a scenario was read from (the main file first, then its includes).
#[derive(Clone, Debug, Default)]
pub struct Sources {
    /// Every file, by [`Span::file`].
    pub files: Vec<SourceFile>,
}

impl Sources {
    /// An error at `span` with a hint.
    pub fn diag(&self, span: Span, message: impl Into<String>, hint: Option<String>) -> Diag {
        let file = self.files.get(span.file as usize);
        let line_text = file
            .and_then(|f| f.text.lines().nth(span.line.saturating_sub(1) as usize))
            .unwrap_or("")
            .to_string();
        Diag {
            path: file.map_or_else(|| "<scenario>".into(), |f| f.path.clone()),
            line: span.line,
            col: span.col,
            len: span.len,
            line_text,
            message: message.into(),
            hint,
        }
    }
}

/// A scenario error that points at text: file, line, column, the line itself and a
/// hint. [`Diag::render`] draws it as compilers do.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{path}:{line}:{col}: {message}")]
pub struct Diag {
    /// The file.
    pub path: String,
    /// Line, from 1.
    pub line: u32,
    /// Column, from 1.
    pub col: u32,
    /// Characters the error covers.
    pub len: u32,
    /// The offending line.
    pub line_text: String,
    /// What is wrong.
    pub message: String,
    /// What to do instead.
    pub hint: Option<String>,
}

impl Diag {
    /// The error with its line and a caret under the offending text, and the hint.
    pub fn render(&self) -> String {
        use annotate_snippets::{Level, Renderer, Snippet};
        let chars: Vec<(usize, char)> = self.line_text.char_indices().collect();
        let byte_at = |col: u32| -> usize {
            let i = col.saturating_sub(1) as usize;
            chars.get(i).map_or(self.line_text.len(), |&(b, _)| b)
        };
        let start = byte_at(self.col);
        let end = byte_at(self.col + self.len.max(1)).max(start);
        let mut msg = Level::Error.title(&self.message).snippet(
            Snippet::source(&self.line_text)
                .line_start(self.line as usize)
                .origin(&self.path)
                .annotation(Level::Error.span(start..end.max(start))),
        );
        if let Some(h) = &self.hint {
            msg = msg.footer(Level::Help.title(h));
        }
        format!("{}\n", Renderer::plain().render(msg))
    }
}

/// Characters of a bare word: anything printable but blanks, quotes, `#`, `=`, `<`,
/// `>`, `!`, braces.
fn is_word_char(c: char) -> bool {
    !c.is_whitespace() && !matches!(c, '"' | '#' | '=' | '<' | '>' | '!' | '{' | '}')
}

fn is_ident_start(c: char) -> bool {
    c.is_ascii_alphabetic() || c == '_'
}

fn is_ident_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-')
}

type In<'a> = LocatingSlice<&'a str>;

/// A located token; `col0` is the byte offset in the line, turned into columns later.
#[derive(Clone, Debug)]
struct RawTok {
    text: String,
    at: std::ops::Range<usize>,
}

fn raw<'a>(
    mut p: impl Parser<In<'a>, &'a str, ErrMode<ContextError>>,
) -> impl Parser<In<'a>, RawTok, ErrMode<ContextError>> {
    move |i: &mut In<'a>| {
        let (text, at) = p.by_ref().with_span().parse_next(i)?;
        Ok(RawTok {
            text: text.to_string(),
            at,
        })
    }
}

fn word(i: &mut In<'_>) -> ModalResult<RawTok> {
    raw(take_while(1.., is_word_char))
        .context(StrContext::Expected(StrContextValue::Description("a word")))
        .parse_next(i)
}

fn ident(i: &mut In<'_>) -> ModalResult<RawTok> {
    raw((one_of(is_ident_start), take_while(0.., is_ident_char)).take())
        .context(StrContext::Expected(StrContextValue::Description("a name")))
        .parse_next(i)
}

fn string(i: &mut In<'_>) -> ModalResult<RawTok> {
    let (s, at) = delimited(
        '"',
        take_till(0.., |c| c == '"'),
        cut_err('"').context(StrContext::Expected(StrContextValue::Description(
            "a closing quote",
        ))),
    )
    .with_span()
    .parse_next(i)?;
    Ok(RawTok {
        text: s.to_string(),
        at,
    })
}

fn value(i: &mut In<'_>) -> ModalResult<RawTok> {
    alt((string, word)).parse_next(i)
}

fn comment(i: &mut In<'_>) -> ModalResult<()> {
    ('#', take_till(0.., |_| false)).void().parse_next(i)
}

/// The end of a line: blanks, an optional comment, nothing else.
fn end(i: &mut In<'_>) -> ModalResult<()> {
    (space0, opt(comment), eof).void().parse_next(i)
}

fn op(i: &mut In<'_>) -> ModalResult<Op> {
    alt((
        ">=".value(Op::Ge),
        "<=".value(Op::Le),
        "!=".value(Op::Ne),
        "=".value(Op::Eq),
        ">".value(Op::Gt),
        "<".value(Op::Lt),
    ))
    .parse_next(i)
}

type RawCheck = (RawTok, Option<(Op, RawTok)>);

fn check(i: &mut In<'_>) -> ModalResult<RawCheck> {
    let key = word.parse_next(i)?;
    let cmp = opt((
        op,
        cut_err(value).context(StrContext::Expected(StrContextValue::Description(
            "a value after the comparison",
        ))),
    ))
    .parse_next(i)?;
    Ok((key, cmp))
}

fn checks(i: &mut In<'_>) -> ModalResult<Vec<RawCheck>> {
    let first = cut_err(check).parse_next(i)?;
    let rest: Vec<RawCheck> = repeat(0.., preceded(space1, check)).parse_next(i)?;
    let mut all = vec![first];
    all.extend(rest);
    Ok(all)
}

fn keyword<'a>(kw: &'static str) -> impl Parser<In<'a>, RawTok, ErrMode<ContextError>> {
    move |i: &mut In<'a>| {
        let start = i.checkpoint();
        let w = word.parse_next(i)?;
        if w.text == kw {
            Ok(w)
        } else {
            i.reset(&start);
            Err(ErrMode::Backtrack(ContextError::new()))
        }
    }
}

type RawArg = (Option<RawTok>, RawTok);

fn arg(i: &mut In<'_>) -> ModalResult<RawArg> {
    alt((
        (
            terminated(ident, '='),
            cut_err(value).context(StrContext::Expected(StrContextValue::Description(
                "a value after '='",
            ))),
        )
            .map(|(k, v)| (Some(k), v)),
        string.map(|v| (None, v)),
        move |i: &mut In<'_>| {
            let start = i.checkpoint();
            let w = word.parse_next(i)?;
            if w.text == "expect" {
                i.reset(&start);
                return Err(ErrMode::Backtrack(ContextError::new()));
            }
            Ok((None, w))
        },
    ))
    .parse_next(i)
}

#[derive(Clone, Debug)]
enum RawLine {
    Blank,
    Close(RawTok),
    Open(RawTok, RawTok),
    Include(RawTok, RawTok),
    Expect(Vec<RawCheck>),
    Call {
        actor: Option<RawTok>,
        bind: Option<RawTok>,
        verb: RawTok,
        args: Vec<RawArg>,
        checks: Vec<RawCheck>,
    },
}

fn actor(i: &mut In<'_>) -> ModalResult<RawTok> {
    terminated(ident, (':', space1)).parse_next(i)
}

fn bind(i: &mut In<'_>) -> ModalResult<RawTok> {
    terminated(ident, (space1, '=', space1)).parse_next(i)
}

fn call(i: &mut In<'_>) -> ModalResult<RawLine> {
    let actor = opt(actor).parse_next(i)?;
    let bind = opt(bind).parse_next(i)?;
    let verb = cut_err(ident)
        .context(StrContext::Expected(StrContextValue::Description(
            "an operation name",
        )))
        .parse_next(i)?;
    let args: Vec<RawArg> = repeat(0.., preceded(space1, arg)).parse_next(i)?;
    let checks = opt(preceded((space1, keyword("expect"), space1), checks))
        .parse_next(i)?
        .unwrap_or_default();
    Ok(RawLine::Call {
        actor,
        bind,
        verb,
        args,
        checks,
    })
}

fn statement(i: &mut In<'_>) -> ModalResult<RawLine> {
    let _ = space0.parse_next(i)?;
    let stmt = alt((
        end.value(RawLine::Blank),
        raw("}".take()).map(RawLine::Close),
        (
            keyword("parallel"),
            preceded(space1, cut_err(ident)),
            preceded(
                space0,
                cut_err('{').context(StrContext::Expected(StrContextValue::CharLiteral('{'))),
            ),
        )
            .map(|(kw, name, _)| RawLine::Open(kw, name)),
        (
            keyword("include"),
            preceded(
                space1,
                cut_err(string).context(StrContext::Expected(StrContextValue::Description(
                    "a quoted file name",
                ))),
            ),
        )
            .map(|(kw, f)| RawLine::Include(kw, f)),
        (keyword("expect"), preceded(space1, checks)).map(|(_, c)| RawLine::Expect(c)),
        call,
    ))
    .parse_next(i)?;
    if !matches!(stmt, RawLine::Blank) {
        cut_err(end)
            .context(StrContext::Expected(StrContextValue::Description(
                "an argument, `expect` or the end of the line",
            )))
            .parse_next(i)?;
    }
    Ok(stmt)
}

/// Where includes are read from.
pub trait Loader {
    /// The text of `path`, capped at [`MAX_SOURCE_BYTES`].
    fn load(&self, path: &Path) -> Result<String, String>;
}

/// Reads includes from the file system.
#[derive(Clone, Copy, Debug, Default)]
pub struct FsLoader;

impl Loader for FsLoader {
    fn load(&self, path: &Path) -> Result<String, String> {
        read_capped(path)
    }
}

/// Reads a scenario file, refusing one larger than [`MAX_SOURCE_BYTES`] or not UTF-8.
pub fn read_capped(path: &Path) -> Result<String, String> {
    use std::io::Read;
    let f = std::fs::File::open(path).map_err(|e| e.to_string())?;
    let mut buf = Vec::new();
    f.take(MAX_SOURCE_BYTES + 1)
        .read_to_end(&mut buf)
        .map_err(|e| e.to_string())?;
    if buf.len() as u64 > MAX_SOURCE_BYTES {
        return Err(format!(
            "larger than {} MiB: not a scenario",
            MAX_SOURCE_BYTES >> 20
        ));
    }
    String::from_utf8(buf).map_err(|e| format!("not UTF-8 text ({e})"))
}

/// A parsed scenario: its sources and its statements.
#[derive(Clone, Debug, Default)]
pub struct Parsed {
    /// The files.
    pub sources: Sources,
    /// The statements, includes expanded in place.
    pub stmts: Vec<Stmt>,
}

struct Parser1<'l> {
    sources: Sources,
    loader: &'l dyn Loader,
    stack: Vec<PathBuf>,
}

/// Column (1-based, in characters) of byte offset `b` of `line`.
fn col_of(line: &str, b: usize) -> u32 {
    line.get(..b).map_or(0, |s| s.chars().count()) as u32 + 1
}

impl Parser1<'_> {
    fn tok(&self, file: u16, line_no: u32, line: &str, t: RawTok) -> Tok {
        let col = col_of(line, t.at.start);
        let end = col_of(line, t.at.end);
        Tok {
            text: t.text,
            span: Span {
                file,
                line: line_no,
                col,
                len: end.saturating_sub(col).max(1),
            },
        }
    }

    fn checks(&self, file: u16, n: u32, line: &str, raw: Vec<RawCheck>) -> Vec<Check> {
        raw.into_iter()
            .map(|(k, cmp)| Check {
                key: self.tok(file, n, line, k),
                cmp: cmp.map(|(op, v)| (op, self.tok(file, n, line, v))),
            })
            .collect()
    }

    fn file(&mut self, path: &str, text: String) -> Result<Vec<Stmt>, Diag> {
        let file = self.sources.files.len() as u16;
        self.sources.files.push(SourceFile {
            path: path.to_string(),
            text: text.clone(),
        });
        // Open groups: (name, its line's span, statements so far); the bottom is the file.
        let mut stack: Vec<(Option<Tok>, Span, Vec<Stmt>)> = vec![(None, Span::default(), vec![])];
        for (idx, line) in text.lines().enumerate() {
            let n = idx as u32 + 1;
            let whole = Span {
                file,
                line: n,
                col: col_of(line, line.len() - line.trim_start().len()),
                len: line.trim().chars().count().max(1) as u32,
            };
            let parsed = statement.parse(LocatingSlice::new(line)).map_err(|e| {
                let off = e.offset();
                let ctx = e.inner().to_string();
                let got: String = line[off..]
                    .chars()
                    .take_while(|c| !c.is_whitespace())
                    .collect();
                let message = if got.is_empty() {
                    "unexpected end of line".to_string()
                } else {
                    format!("unexpected `{got}`")
                };
                let hint = (!ctx.is_empty()).then(|| ctx.replace('\n', "; "));
                self.sources.diag(
                    Span {
                        file,
                        line: n,
                        col: col_of(line, off),
                        len: got.chars().count().max(1) as u32,
                    },
                    message,
                    hint,
                )
            })?;
            let top = stack.len() - 1;
            match parsed {
                RawLine::Blank => {}
                RawLine::Close(t) => {
                    if stack.len() == 1 {
                        let t = self.tok(file, n, line, t);
                        return Err(self.sources.diag(
                            t.span,
                            "`}` closes no parallel group",
                            None,
                        ));
                    }
                    let (name, span, body) = stack.pop().unwrap_or_default();
                    let Some(name) = name else { continue };
                    if body.is_empty() {
                        return Err(self.sources.diag(
                            span,
                            format!("parallel group `{}` has no steps", name.text),
                            None,
                        ));
                    }
                    let outer = stack.len() - 1;
                    stack[outer].2.push(Stmt {
                        span,
                        kind: StmtKind::Parallel { name, body },
                    });
                }
                RawLine::Open(kw, name) => {
                    if stack.len() > 1 {
                        let kw = self.tok(file, n, line, kw);
                        return Err(self.sources.diag(
                            kw.span,
                            "parallel groups do not nest",
                            Some("close the open group with `}` first".into()),
                        ));
                    }
                    let name = self.tok(file, n, line, name);
                    stack.push((Some(name), whole, vec![]));
                }
                RawLine::Include(kw, f) => {
                    let kw = self.tok(file, n, line, kw);
                    let f = self.tok(file, n, line, f);
                    if stack.len() > 1 {
                        return Err(self.sources.diag(
                            kw.span,
                            "`include` inside a parallel group",
                            Some("include files at the top level".into()),
                        ));
                    }
                    let stmts = self.include(path, &f)?;
                    stack[top].2.extend(stmts);
                }
                RawLine::Expect(c) => {
                    let checks = self.checks(file, n, line, c);
                    stack[top].2.push(Stmt {
                        span: whole,
                        kind: StmtKind::Expect(checks),
                    });
                }
                RawLine::Call {
                    actor,
                    bind,
                    verb,
                    args,
                    checks,
                } => {
                    let call = Call {
                        actor: actor.map(|t| self.tok(file, n, line, t)),
                        bind: bind.map(|t| self.tok(file, n, line, t)),
                        verb: self.tok(file, n, line, verb),
                        args: args
                            .into_iter()
                            .map(|(k, v)| Arg {
                                key: k.map(|k| self.tok(file, n, line, k)),
                                value: self.tok(file, n, line, v),
                            })
                            .collect(),
                        checks: self.checks(file, n, line, checks),
                    };
                    stack[top].2.push(Stmt {
                        span: whole,
                        kind: StmtKind::Call(call),
                    });
                }
            }
        }
        if stack.len() > 1 {
            let (name, span, _) = stack.pop().unwrap_or_default();
            return Err(self.sources.diag(
                span,
                format!(
                    "parallel group `{}` is never closed",
                    name.map(|t| t.text).unwrap_or_default()
                ),
                Some("end it with a line holding `}`".into()),
            ));
        }
        Ok(stack.pop().map(|s| s.2).unwrap_or_default())
    }

    fn include(&mut self, from: &str, f: &Tok) -> Result<Vec<Stmt>, Diag> {
        let base = Path::new(from).parent().unwrap_or(Path::new(""));
        let target = base.join(&f.text);
        let key = std::fs::canonicalize(&target).unwrap_or_else(|_| target.clone());
        if let Some(pos) = self.stack.iter().position(|p| *p == key) {
            let chain: Vec<String> = self.stack[pos..]
                .iter()
                .chain(std::iter::once(&key))
                .map(|p| p.display().to_string())
                .collect();
            return Err(self.sources.diag(
                f.span,
                format!("include cycle: {}", chain.join(" -> ")),
                Some("a file may not include itself, directly or through others".into()),
            ));
        }
        if self.stack.len() >= MAX_INCLUDE_DEPTH {
            return Err(self.sources.diag(
                f.span,
                format!("includes nest deeper than {MAX_INCLUDE_DEPTH}"),
                None,
            ));
        }
        let text = self.loader.load(&target).map_err(|e| {
            self.sources.diag(
                f.span,
                format!("cannot include {}: {e}", target.display()),
                None,
            )
        })?;
        self.stack.push(key);
        let out = self.file(&target.display().to_string(), text);
        self.stack.pop();
        out
    }
}

/// Parses `text`, named `path` in errors; includes are resolved relative to `path`
/// through `loader`.
pub fn parse(path: &str, text: &str, loader: &dyn Loader) -> Result<Parsed, Diag> {
    let mut p = Parser1 {
        sources: Sources::default(),
        loader,
        stack: vec![std::fs::canonicalize(path).unwrap_or_else(|_| PathBuf::from(path))],
    };
    let stmts = p.file(path, text.to_string())?;
    Ok(Parsed {
        sources: p.sources,
        stmts,
    })
}

/// A loader that refuses every include (embedded scenarios, the parser fuzz test).
#[derive(Clone, Copy, Debug, Default)]
pub struct NoIncludes;

impl Loader for NoIncludes {
    fn load(&self, path: &Path) -> Result<String, String> {
        Err(format!(
            "{}: includes are not available here",
            path.display()
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(text: &str) -> Stmt {
        let p = parse("t.scn", text, &NoIncludes).expect("parses");
        assert_eq!(p.stmts.len(), 1, "{:?}", p.stmts);
        p.stmts[0].clone()
    }

    #[test]
    fn a_call_has_actor_bind_verb_args_and_checks() {
        let s = one("  a: buf = mmap anon 1M prot=rw   expect ok # why\n");
        let StmtKind::Call(c) = s.kind else {
            panic!("not a call")
        };
        assert_eq!(c.actor.as_ref().map(|t| t.text.as_str()), Some("a"));
        assert_eq!(c.bind.as_ref().map(|t| t.text.as_str()), Some("buf"));
        assert_eq!(c.verb.text, "mmap");
        assert_eq!(c.verb.span.col, 12);
        assert_eq!(c.args.len(), 3);
        assert_eq!(
            c.args[2].key.as_ref().map(|t| t.text.as_str()),
            Some("prot")
        );
        assert_eq!(c.args[2].value.text, "rw");
        assert_eq!(c.args[2].value.span.col, 30);
        assert_eq!(c.checks.len(), 1);
        assert_eq!(c.checks[0].key.text, "ok");
    }

    #[test]
    fn checks_take_comparisons() {
        let s = one("expect pinned=16 faults>=1 violations!=3");
        let StmtKind::Expect(c) = s.kind else {
            panic!("not expect")
        };
        let ops: Vec<Op> = c
            .iter()
            .filter_map(|c| c.cmp.as_ref().map(|x| x.0))
            .collect();
        assert_eq!(ops, vec![Op::Eq, Op::Ge, Op::Ne]);
        assert_eq!(c[1].cmp.as_ref().map(|x| x.1.text.as_str()), Some("1"));
    }

    #[test]
    fn a_bdf_is_a_word_and_not_an_actor() {
        let s = one("device n0 nvme at=0000:03:00.0");
        let StmtKind::Call(c) = s.kind else {
            panic!("not a call")
        };
        assert!(c.actor.is_none());
        assert_eq!(c.args[2].value.text, "0000:03:00.0");
    }

    #[test]
    fn groups_collect_their_lines() {
        let p = parse(
            "t.scn",
            "process a\nparallel g {\n a: read x 4K\n a: write x 4K fill=1\n}\nexpect pinned=0\n",
            &NoIncludes,
        )
        .expect("parses");
        assert_eq!(p.stmts.len(), 3);
        let StmtKind::Parallel { name, body } = &p.stmts[1].kind else {
            panic!("not a group")
        };
        assert_eq!(name.text, "g");
        assert_eq!(body.len(), 2);
    }

    #[test]
    fn errors_point_at_line_and_column() {
        let e = parse("t.scn", "process a\n\na: read x 4K expect\n", &NoIncludes)
            .expect_err("incomplete expect");
        assert_eq!((e.line, e.path.as_str()), (3, "t.scn"));
        let e = parse("t.scn", "a: mmap \"anon\n", &NoIncludes).expect_err("open quote");
        assert_eq!(e.line, 1);
        assert!(e.render().contains("t.scn:1:"), "{}", e.render());
        let e = parse("t.scn", "parallel g {\n a: read x\n", &NoIncludes).expect_err("open");
        assert!(e.message.contains("never closed"), "{e}");
        let e = parse("t.scn", "}\n", &NoIncludes).expect_err("stray");
        assert!(e.message.contains("closes no"), "{e}");
        let e = parse("t.scn", "a: read x len=\n", &NoIncludes).expect_err("no value");
        assert_eq!(e.col, 15, "{e}");
    }
}
