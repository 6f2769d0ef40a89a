//! Which reads fetch a slave's register map: as few as possible, because every
//! request costs a turn on a half-duplex bus.
//!
//! Registers of one function whose ranges touch or overlap share one read, up to the
//! Modbus limit per request (125 registers, 2000 bits). Ranges with a gap between
//! them are not merged: asking for addresses the map does not name can make a
//! device answer with an exception for the whole read.

use serde_json::Value;

use super::registers::{DecodeError, Function, Register};

/// One read request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Read {
    pub function: Function,
    pub address: u16,
    pub count: u16,
}

/// What one read returned.
#[derive(Debug, Clone, PartialEq)]
pub enum Answer {
    Words(Vec<u16>),
    Bits(Vec<bool>),
}

/// The reads for a register map, and where each register's value sits in them.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    pub reads: Vec<Read>,
    /// For each register, in map order: its read's index and its offset in that read.
    at: Vec<(usize, usize)>,
}

impl Plan {
    pub fn new(registers: &[Register]) -> Plan {
        let mut order: Vec<usize> = (0..registers.len()).collect();
        order.sort_by_key(|&i| (registers[i].function, registers[i].address));
        let mut reads: Vec<Read> = Vec::new();
        let mut at = vec![(0, 0); registers.len()];
        for i in order {
            let r = &registers[i];
            let start = u32::from(r.address);
            let end = start + u32::from(r.width());
            let joins = reads.last().and_then(|last| {
                let last_start = u32::from(last.address);
                let last_end = last_start + u32::from(last.count);
                let new_end = last_end.max(end);
                (last.function == r.function
                    && start <= last_end
                    && new_end - last_start <= u32::from(r.function.max_per_read()))
                .then_some(new_end - last_start)
            });
            let last_index = reads.len().saturating_sub(1);
            match (joins, reads.last_mut()) {
                (Some(count), Some(last)) => {
                    // At most max_per_read (checked just above), so it fits.
                    last.count = u16::try_from(count).unwrap_or(last.count);
                    at[i] = (last_index, (start - u32::from(last.address)) as usize);
                }
                _ => {
                    reads.push(Read {
                        function: r.function,
                        address: r.address,
                        count: r.width(),
                    });
                    at[i] = (reads.len() - 1, 0);
                }
            }
        }
        Plan { reads, at }
    }

    /// The registers whose values `read` (an index into [`Plan::reads`]) fetches, as
    /// indexes into the register map, in map order: what a refused read leaves out.
    pub fn registers_of(&self, read: usize) -> impl Iterator<Item = usize> + '_ {
        self.at
            .iter()
            .enumerate()
            .filter(move |(_, &(r, _))| r == read)
            .map(|(k, _)| k)
    }

    /// Each register's value, in map order, from one entry per read (in
    /// [`Plan::reads`] order; `None` for a read the slave refused). A register of a
    /// refused read gets `None`: neither a value nor a decode error, since the
    /// refusal is counted and logged on its own. The others get their value, or why
    /// it could not be decoded (their field is left out of the reading).
    pub fn values(
        &self,
        registers: &[Register],
        answers: &[Option<Answer>],
    ) -> Vec<Option<Result<Value, DecodeError>>> {
        registers
            .iter()
            .zip(&self.at)
            .map(|(r, &(read, offset))| {
                let answer = match answers.get(read) {
                    Some(None) => return None,
                    // No entry at all for its read: decoded as nothing, so short.
                    Some(Some(answer)) => Some(answer),
                    None => None,
                };
                Some(match (r.function.is_bits(), answer) {
                    (false, Some(Answer::Words(words))) => {
                        r.decode_words(words.get(offset..).unwrap_or(&[]))
                    }
                    (true, Some(Answer::Bits(bits))) => {
                        r.decode_bits(bits.get(offset..).unwrap_or(&[]))
                    }
                    _ => Err(DecodeError::Short {
                        field: r.field.clone(),
                        want: usize::from(r.width()),
                        got: 0,
                    }),
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::super::registers::RegisterConfig;
    use super::*;
    use serde_json::{json, Map};

    /// The reading's fields and the decode errors, as the bus task builds them.
    fn fields(
        plan: &Plan,
        registers: &[Register],
        answers: &[Option<Answer>],
    ) -> (Map<String, Value>, Vec<DecodeError>) {
        let mut fields = Map::new();
        let mut errors = Vec::new();
        for (r, value) in registers.iter().zip(plan.values(registers, answers)) {
            match value {
                Some(Ok(v)) => {
                    fields.insert(r.field.clone(), v);
                }
                Some(Err(e)) => errors.push(e),
                None => {}
            }
        }
        (fields, errors)
    }

    fn map(entries: &[(&str, u16, &str, &str)]) -> Vec<Register> {
        entries
            .iter()
            .map(|(field, address, function, ty)| {
                let text = format!(
                    "field='{field}'\naddress={address}\nfunction='{function}'\ntype='{ty}'"
                );
                toml::from_str::<RegisterConfig>(&text)
                    .unwrap()
                    .check()
                    .unwrap()
            })
            .collect()
    }

    fn read(function: Function, address: u16, count: u16) -> Read {
        Read {
            function,
            address,
            count,
        }
    }

    #[test]
    fn contiguous_registers_of_one_function_share_one_read() {
        let regs = map(&[
            ("a", 0, "holding", "u16"),
            ("b", 1, "holding", "f32"),
            ("c", 3, "holding", "i16"),
        ]);
        assert_eq!(Plan::new(&regs).reads, [read(Function::Holding, 0, 4)]);
    }

    #[test]
    fn a_gap_or_another_function_starts_a_new_read() {
        let regs = map(&[
            ("a", 0, "holding", "u16"),
            ("b", 2, "holding", "u16"),
            ("c", 1, "input", "u16"),
            ("d", 0, "coil", "bool"),
        ]);
        assert_eq!(
            Plan::new(&regs).reads,
            [
                read(Function::Holding, 0, 1),
                read(Function::Holding, 2, 1),
                read(Function::Input, 1, 1),
                read(Function::Coil, 0, 1),
            ]
        );
    }

    #[test]
    fn overlapping_registers_are_read_once() {
        // A 32-bit value and a 16-bit view of its low word.
        let regs = map(&[("all", 10, "input", "u32"), ("low", 11, "input", "u16")]);
        let plan = Plan::new(&regs);
        assert_eq!(plan.reads, [read(Function::Input, 10, 2)]);
        let (fields, errors) = fields(&plan, &regs, &[Some(Answer::Words(vec![1, 2]))]);
        assert!(errors.is_empty());
        assert_eq!(Value::Object(fields), json!({"all": 65538, "low": 2}));
    }

    #[test]
    fn a_read_never_exceeds_the_modbus_limits() {
        let regs: Vec<Register> = (0..300u16)
            .map(|i| {
                toml::from_str::<RegisterConfig>(&format!("field='r{i}'\naddress={i}"))
                    .unwrap()
                    .check()
                    .unwrap()
            })
            .collect();
        let plan = Plan::new(&regs);
        assert_eq!(
            plan.reads,
            [
                read(Function::Holding, 0, 125),
                read(Function::Holding, 125, 125),
                read(Function::Holding, 250, 50),
            ]
        );
        let bits: Vec<Register> = (0..2001u16)
            .map(|i| {
                toml::from_str::<RegisterConfig>(&format!(
                    "field='b{i}'\naddress={i}\nfunction='coil'"
                ))
                .unwrap()
                .check()
                .unwrap()
            })
            .collect();
        assert_eq!(
            Plan::new(&bits).reads,
            [read(Function::Coil, 0, 2000), read(Function::Coil, 2000, 1)]
        );
    }

    #[test]
    fn a_32_bit_value_that_would_cross_the_limit_starts_the_next_read() {
        let mut entries: Vec<(String, u16)> = (0..124u16).map(|i| (format!("r{i}"), i)).collect();
        entries.push(("wide".into(), 124));
        let regs: Vec<Register> = entries
            .iter()
            .map(|(f, a)| {
                let ty = if f == "wide" { "f32" } else { "u16" };
                toml::from_str::<RegisterConfig>(&format!("field='{f}'\naddress={a}\ntype='{ty}'"))
                    .unwrap()
                    .check()
                    .unwrap()
            })
            .collect();
        assert_eq!(
            Plan::new(&regs).reads,
            [
                read(Function::Holding, 0, 124),
                read(Function::Holding, 124, 2)
            ]
        );
    }

    #[test]
    fn the_last_addresses_do_not_overflow() {
        let regs = map(&[
            ("a", 65534, "holding", "u32"),
            ("b", 65535, "holding", "u16"),
        ]);
        assert_eq!(Plan::new(&regs).reads, [read(Function::Holding, 65534, 2)]);
    }

    #[test]
    fn fields_come_from_their_reads_in_map_order() {
        let regs = map(&[
            ("door", 3, "discrete", "bool"),
            ("t", 0, "holding", "i16"),
            ("rh", 1, "holding", "u16"),
        ]);
        let plan = Plan::new(&regs);
        assert_eq!(
            plan.reads,
            [
                read(Function::Holding, 0, 2),
                read(Function::Discrete, 3, 1)
            ]
        );
        let answers = [
            Some(Answer::Words(vec![(-5i16) as u16, 40])),
            Some(Answer::Bits(vec![
                true, false, false, false, false, false, false, false,
            ])),
        ];
        let (fields, errors) = fields(&plan, &regs, &answers);
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(
            Value::Object(fields),
            json!({"door": true, "t": -5, "rh": 40})
        );
    }

    #[test]
    fn a_short_or_missing_answer_leaves_out_only_the_fields_it_lacks() {
        let regs = map(&[("a", 0, "holding", "u16"), ("b", 1, "holding", "u32")]);
        let plan = Plan::new(&regs);
        let (got, errors) = fields(&plan, &regs, &[Some(Answer::Words(vec![7, 8]))]);
        assert_eq!(Value::Object(got), json!({"a": 7}));
        assert_eq!(errors.len(), 1);
        let (got, errors) = fields(&plan, &regs, &[]);
        assert!(got.is_empty());
        assert_eq!(errors.len(), 2);
        let (_, errors) = fields(&plan, &regs, &[Some(Answer::Bits(vec![true]))]);
        assert_eq!(
            errors.len(),
            2,
            "registers given bits decode as nothing: {errors:?}"
        );
    }

    #[test]
    fn a_refused_read_leaves_out_its_fields_without_decode_errors() {
        let regs = map(&[
            ("t", 0, "holding", "i16"),
            ("valve", 100, "holding", "u16"),
            ("door", 3, "discrete", "bool"),
        ]);
        let plan = Plan::new(&regs);
        assert_eq!(plan.reads.len(), 3);
        let answers = [
            Some(Answer::Words(vec![7])),
            None,
            Some(Answer::Bits(vec![true; 8])),
        ];
        let values = plan.values(&regs, &answers);
        assert_eq!(values[1], None, "valve's read was refused");
        let (got, errors) = fields(&plan, &regs, &answers);
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(Value::Object(got), json!({"t": 7, "door": true}));
    }

    #[test]
    fn a_read_covers_the_registers_whose_values_it_fetches_in_map_order() {
        let regs = map(&[
            ("flow", 1, "holding", "f32"),
            ("door", 3, "discrete", "bool"),
            ("setpoint", 0, "holding", "i16"),
        ]);
        let plan = Plan::new(&regs);
        assert_eq!(plan.reads[0], read(Function::Holding, 0, 3));
        assert_eq!(plan.registers_of(0).collect::<Vec<_>>(), [0, 2]);
        assert_eq!(plan.registers_of(1).collect::<Vec<_>>(), [1]);
        assert_eq!(plan.registers_of(2).count(), 0);
    }
}
