//! How much work one evaluation of a condition may take, bounded before it runs.
//!
//! CEL always terminates, but the list macros (`all`, `exists`, `exists_one`, `map`,
//! `filter`) loop over the lists and maps of a reading, and one inside another loops
//! over the product: `a.exists(x, a.exists(y, x + y < 0.0))` on an 8,000-element list
//! is 64 million steps, seconds of a small board's CPU with ingestion stalled behind
//! it. The cel crate has no hook to count steps while it runs, so the work is bounded
//! beforehand:
//!
//! - when compiling, [`Cost::of`] finds how an expression's work grows with the size
//!   `n` of a reading: a polynomial `Σ terms[d] · n^d`, where `terms[d]` counts the
//!   pieces of work (a node of the syntax tree evaluated, a value copied or compared)
//!   that happen up to `n^d` times;
//! - when evaluating, `n` is the reading's size (every value, plus the bytes of every
//!   string and key; see [`Bindings`](crate::expr::Bindings)), and a condition whose
//!   bound at that `n` exceeds [`MAX_EVAL_STEPS`] is not run: the rule gets an
//!   evaluation error for that reading, and every other rule still runs.
//!
//! # The bound
//!
//! Every value an expression computes has a size exponent: its size is at most
//! `n^whole`. A field of the reading has exponent 1; a literal, a comparison, a
//! number, 0; `a + b` the larger of its operands'; `list.map(x, e)` the list's plus
//! `e`'s. A loop's body runs `n^k` times more often than the loop, where `k` is the
//! exponent of the list it loops over, and work linear in a value's size (copying,
//! concatenating, comparing, `in`, `size` of a string) costs `n^exponent`.
//!
//! That alone would call `tags.exists(t, t == 'x')` quadratic, because `t` could be as
//! large as the reading. But the elements of one list together are no larger than the
//! list: summed over the loop, work linear in `t` is linear in `tags`. So a loop
//! variable is *amortized*: work on it costs nothing beyond the loop's own `n^k`. The
//! credit is spent once: looping over a loop variable (`x.exists(y, ...)`) costs no
//! more than the outer loop, but inside that inner loop `x` is no longer amortized
//! (`x.exists(y, x.exists(z, ...))` is quadratic, as it is).
//!
//! The bound is an upper bound up to small constant factors, never an estimate that
//! can fall short by a power of `n`. It is conservative where the value a name holds
//! is only known per reading: a field compared inside a loop (`a.exists(x, x > t)`)
//! costs nothing, but a field copied or concatenated inside one (`a.exists(x, x - t >
//! 0.0)`, which copies `t` into its error when `t` is a list) counts as linear.

use cel::common::ast::{operators, EntryExpr, Expr, IdedEntryExpr, IdedExpr};

/// The most work one evaluation of one condition may take, in the steps [`Cost`]
/// counts: roughly a node of the expression evaluated, or a value copied or compared.
/// Tens of milliseconds of a small board's core: `a.exists(x, x > 0.0)` fits for a list
/// of 50,000 numbers, `a.exists(x, a.exists(y, x == y))` for one of 300 but not 350.
pub const MAX_EVAL_STEPS: u64 = 1_000_000;

/// Powers of `n` above this are counted as this one: with `n` at least 3 (any
/// reading with a field), `n^16` is far past [`MAX_EVAL_STEPS`] already.
const MAX_DEGREE: usize = 16;

/// An expression's work as a polynomial in the size of a reading.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Cost {
    /// `terms[d]`: pieces of work done up to `n^d` times.
    terms: Vec<u64>,
    /// How deep list macros nest inside each other's bodies: 1 for
    /// `a.exists(x, x > 1.0)`, 2 for `a.exists(x, b.exists(y, x == y))`.
    pub nesting: usize,
}

impl Cost {
    /// The cost of evaluating `root`. Recurses once per level of the syntax tree, which
    /// [`Condition::compile`](crate::expr::Condition::compile) bounds before calling it.
    pub(crate) fn of(root: &IdedExpr) -> Cost {
        let mut walk = Walk {
            terms: vec![0; MAX_DEGREE + 1],
            vars: Vec::new(),
            nesting: 0,
            deepest: 0,
        };
        let size = walk.node(root, 0);
        // Turning the result into a value copies it.
        walk.work(size.amortized);
        Cost {
            terms: walk.terms,
            nesting: walk.deepest,
        }
    }

    /// The highest power of `n` the work grows with: 0 for a condition without loops,
    /// 1 for one loop over a field, 2 for a loop inside a loop.
    pub(crate) fn degree(&self) -> usize {
        self.terms.iter().rposition(|&t| t > 0).unwrap_or(0)
    }

    /// The bound on the steps of one evaluation on a reading of size `n`, saturating.
    pub(crate) fn steps(&self, n: u64) -> u64 {
        let mut total = 0u64;
        let mut power = 1u64;
        for &term in &self.terms {
            total = total.saturating_add(term.saturating_mul(power));
            power = power.saturating_mul(n);
        }
        total
    }
}

/// The size of a value, as exponents of `n`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
struct Size {
    /// Counted once per evaluation of the innermost loop the value is computed in;
    /// less than `whole` for a loop variable, whose sizes add up to its list's.
    amortized: usize,
    /// Its size in any one evaluation.
    whole: usize,
}

impl Size {
    const SCALAR: Size = Size {
        amortized: 0,
        whole: 0,
    };

    /// A field of the reading, or anything else a name may hold.
    const FIELD: Size = Size {
        amortized: 1,
        whole: 1,
    };

    fn max(self, other: Size) -> Size {
        Size {
            amortized: self.amortized.max(other.amortized),
            whole: self.whole.max(other.whole),
        }
    }
}

struct Walk<'a> {
    terms: Vec<u64>,
    /// The loop variables in scope, innermost last.
    vars: Vec<(&'a str, Size)>,
    /// How many loop bodies the node being walked is in.
    nesting: usize,
    deepest: usize,
}

impl<'a> Walk<'a> {
    /// Records one piece of work done `n^degree` times.
    fn work(&mut self, degree: usize) {
        let term = &mut self.terms[degree.min(MAX_DEGREE)];
        *term = term.saturating_add(1);
    }

    /// Walks `node`, evaluated `n^times` times; returns the size of its value.
    fn node(&mut self, node: &'a IdedExpr, times: usize) -> Size {
        self.work(times);
        match &node.expr {
            Expr::Literal(_) | Expr::Unspecified => Size::SCALAR,
            Expr::Ident(name) => self
                .vars
                .iter()
                .rev()
                .find(|(var, _)| var == name)
                .map_or(Size::FIELD, |(_, size)| *size),
            Expr::Select(select) => {
                let operand = self.node(&select.operand, times);
                if select.test {
                    Size::SCALAR
                } else {
                    operand
                }
            }
            Expr::List(list) => {
                let items: Vec<Size> = list
                    .elements
                    .iter()
                    .map(|item| self.node(item, times))
                    .collect();
                self.copies(&items, times)
            }
            Expr::Map(map) => {
                let items = self.entries(&map.entries, times);
                self.copies(&items, times)
            }
            Expr::Struct(s) => {
                let items = self.entries(&s.entries, times);
                self.copies(&items, times)
            }
            Expr::Call(call) => {
                let args: Vec<Size> = call
                    .target
                    .iter()
                    .map(|target| &**target)
                    .chain(&call.args)
                    .map(|arg| self.node(arg, times))
                    .collect();
                self.call(&call.func_name, &args, times)
            }
            Expr::Comprehension(c) => {
                let range = self.node(&c.iter_range, times);
                let init = self.node(&c.accu_init, times);
                // Going through the list copies each element once.
                let body = times + range.amortized;
                self.work(body);
                let outer = self.vars.len();
                let saved: Vec<Size> = self.vars.iter().map(|(_, size)| *size).collect();
                if range.amortized < range.whole {
                    // The range is a loop variable (or made of one): its amortization
                    // is spent on this loop, so in the body every variable counts in
                    // full.
                    for (_, size) in &mut self.vars {
                        size.amortized = size.whole;
                    }
                }
                let element = Size {
                    amortized: 0,
                    whole: range.whole,
                };
                self.vars.push((c.iter_var.as_str(), element));
                if let Some(second) = &c.iter_var2 {
                    self.vars.push((second.as_str(), element));
                }
                // Every macro only folds into its accumulator (`@result || ...`) or
                // appends to it (`@result + [...]`, appended in place by cel), and
                // `@result` cannot be written in an expression.
                self.vars.push((c.accu_var.as_str(), Size::SCALAR));
                self.nesting += 1;
                self.deepest = self.deepest.max(self.nesting);
                self.node(&c.loop_cond, body);
                let step = self.node(&c.loop_step, body);
                self.nesting -= 1;
                self.vars.truncate(outer);
                for ((_, size), before) in self.vars.iter_mut().zip(saved) {
                    *size = before;
                }
                let accumulated = init.max(Size {
                    amortized: range.amortized + step.amortized,
                    whole: range.whole + step.amortized,
                });
                self.vars.push((c.accu_var.as_str(), accumulated));
                let result = self.node(&c.result, times);
                self.vars.truncate(outer);
                result
            }
        }
    }

    fn entries(&mut self, entries: &'a [IdedEntryExpr], times: usize) -> Vec<Size> {
        let mut sizes = Vec::new();
        for entry in entries {
            match &entry.expr {
                EntryExpr::MapEntry(e) => {
                    sizes.push(self.node(&e.key, times));
                    sizes.push(self.node(&e.value, times));
                }
                EntryExpr::StructField(f) => sizes.push(self.node(&f.value, times)),
            }
        }
        sizes
    }

    /// Work linear in each of `items`, giving a value as large as the largest.
    fn copies(&mut self, items: &[Size], times: usize) -> Size {
        for item in items {
            self.work(times + item.amortized);
        }
        items.iter().fold(Size::SCALAR, |all, item| all.max(*item))
    }

    /// The work of calling `function` on `args` and the size of its result.
    fn call(&mut self, function: &str, args: &[Size], times: usize) -> Size {
        match function {
            // Only look at bools.
            operators::LOGICAL_AND
            | operators::LOGICAL_OR
            | operators::LOGICAL_NOT
            | operators::NOT_STRICTLY_FALSE => Size::SCALAR,
            // Stop at the end of the smaller operand; when the types do not compare,
            // the error names only the types.
            operators::EQUALS
            | operators::NOT_EQUALS
            | operators::LESS
            | operators::LESS_EQUALS
            | operators::GREATER
            | operators::GREATER_EQUALS => {
                let smaller = args.iter().map(|a| a.amortized).min().unwrap_or(0);
                self.work(times + smaller);
                Size::SCALAR
            }
            // Passes one branch on: the work on it is the caller's.
            operators::CONDITIONAL => args
                .iter()
                .skip(1)
                .fold(Size::SCALAR, |all, arg| all.max(*arg)),
            // Linear in every argument, and a scalar comes out.
            operators::IN
            | "size"
            | "contains"
            | "startsWith"
            | "endsWith"
            | "int"
            | "uint"
            | "double"
            | "bool"
            | "type" => {
                self.copies(args, times);
                Size::SCALAR
            }
            // An element of the container: hashing or comparing the key.
            operators::INDEX => {
                self.copies(args.get(1..).unwrap_or_default(), times);
                args.first().copied().unwrap_or(Size::SCALAR)
            }
            // Anything else (`+`, `string`, arithmetic, whose type errors copy both
            // operands): linear in every argument, as large as the largest.
            _ => self.copies(args, times),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cost(expr: &str) -> Cost {
        let env = cel::Env::stdlib();
        match env.compile(expr) {
            Ok(program) => Cost::of(program.expression()),
            Err(error) => panic!("{expr}: {error:?}"),
        }
    }

    #[test]
    fn a_condition_without_loops_costs_the_same_on_any_reading() {
        for expr in [
            "t > 1.0",
            "a > 1.0 && b < 2.0 || door == 'open'",
            "x == 'open'",
            "has(bp.pulse) && bp.pulse > 100.0",
            "m['a'] == 1.0",
        ] {
            assert_eq!((expr, cost(expr).degree()), (expr, 0));
            assert_eq!(cost(expr).nesting, 0, "{expr}");
        }
    }

    #[test]
    fn linear_work_on_a_field_grows_with_the_reading() {
        for expr in [
            "size(s) > 3",
            "'x' in zones",
            "s + 'x' == 'yx'",
            "s.contains('x')",
            "x == y",
        ] {
            assert_eq!((expr, cost(expr).degree()), (expr, 1));
        }
    }

    #[test]
    fn one_loop_over_a_field_is_linear_even_with_work_on_its_elements() {
        for expr in [
            "a.exists(x, x > 0.0)",
            "tags.exists(t, t == 'x' || t.startsWith('y'))",
            "a.all(x, x > t)",
            "a.map(x, x * 2.0).exists(v, v > 10.0)",
            "a.filter(x, x > 1.0).size() > 2",
            "a.exists(x, x.exists(y, y > 0.0))",
            "a.exists(x, x.exists(y, x == y))",
            "rooms.exists(r, r.sensors.exists(s, s > 30.0))",
            // After the loop over `x`, `x` is amortized again.
            "a.exists(x, x.exists(y, y > 0.0) && size(x + x) > 0)",
            "[1, 2].exists(i, a.exists(x, x > 1.0))",
        ] {
            let c = cost(expr);
            assert_eq!((expr, c.degree()), (expr, 1));
        }
    }

    #[test]
    fn a_loop_inside_a_loop_over_fields_is_quadratic() {
        for expr in [
            "a.exists(x, a.exists(y, x + y < 0.0))",
            "a.exists(x, b.exists(y, x == y))",
            "a.exists(x, x in b)",
            "a.exists(x, x - t > 0.0)",
            "a.exists(x, x.exists(y, x.exists(z, z == y)))",
            "a.map(x, a).exists(l, l.exists(y, y > 0.0))",
            "a.exists(x, x.exists(y, x + [y] != []))",
        ] {
            let c = cost(expr);
            assert_eq!((expr, c.degree()), (expr, 2));
        }
        assert_eq!(cost("a.exists(x, a.exists(y, x + y < 0.0))").nesting, 2);
        assert_eq!(
            cost("a.exists(x, a.exists(y, a.exists(z, x + y + z < 0.0)))").degree(),
            3
        );
    }

    #[test]
    fn the_bound_is_the_polynomial_at_the_readings_size_and_saturates() {
        let c = cost("a.exists(x, a.exists(y, x + y < 0.0))");
        assert!(c.steps(8_001) > MAX_EVAL_STEPS, "{c:?}");
        assert!(c.steps(100) < MAX_EVAL_STEPS, "{c:?}");
        assert_eq!(c.steps(u64::MAX), u64::MAX);
        let linear = cost("a.exists(x, x > 0.0)");
        assert!(linear.steps(50_000) < MAX_EVAL_STEPS, "{linear:?}");
        assert_eq!(cost("true").steps(1_000_000), 2);
        // As documented on MAX_EVAL_STEPS.
        let pairs = cost("a.exists(x, a.exists(y, x == y))");
        let simple = cost("a.exists(x, x > 0.0)");
        assert!(pairs.steps(310) < MAX_EVAL_STEPS, "{pairs:?}");
        assert!(pairs.steps(360) > MAX_EVAL_STEPS, "{pairs:?}");
        assert!(simple.steps(50_010) < MAX_EVAL_STEPS, "{simple:?}");
    }
}
