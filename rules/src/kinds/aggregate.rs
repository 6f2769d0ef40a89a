//! `aggregate`: avg/min/max/sum/count/last of fields over tumbling windows per device.

use super::earliest;
use crate::devices::{Devices, Untracked};
use crate::engine::{Outcome, Reading, Transition};
use crate::rule::{time_value, Effects, Event, FieldPath};
use chrono::{DateTime, TimeDelta, Utc};
use serde_json::{Map, Value};

/// An aggregate function.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Function {
    Avg,
    Min,
    Max,
    Sum,
    Count,
    Last,
}

impl Function {
    pub(crate) const ALL: [Function; 6] = [
        Function::Avg,
        Function::Min,
        Function::Max,
        Function::Sum,
        Function::Count,
        Function::Last,
    ];

    pub(crate) fn name(self) -> &'static str {
        match self {
            Function::Avg => "avg",
            Function::Min => "min",
            Function::Max => "max",
            Function::Sum => "sum",
            Function::Count => "count",
            Function::Last => "last",
        }
    }

    pub(crate) fn from_name(name: &str) -> Option<Function> {
        Function::ALL.into_iter().find(|f| f.name() == name)
    }
}

/// Per device, readings are grouped into windows `every` long, aligned to the Unix
/// epoch (`[k·every, (k+1)·every)` in UTC), by reading time. A window closes, giving
/// one `window` event with the window's end as event time, when a reading of a
/// later window arrives or a tick reaches its end, whichever comes first. A reading
/// for a window that has already closed is late: it is not aggregated, and that is
/// reported as an [`EvalError`](crate::EvalError).
#[derive(Debug)]
pub(crate) struct Aggregate {
    pub every: TimeDelta,
    pub fields: Vec<FieldPath>,
    pub functions: Vec<Function>,
    pub devices: Devices<State>,
    /// No window ends before this (see [`Stale`](super::Stale)).
    pub next_due: Option<DateTime<Utc>>,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct State {
    open: Option<Window>,
    /// Index of the last window closed: readings for it or earlier are late.
    closed_through: Option<i64>,
}

#[derive(Debug, Clone, PartialEq)]
struct Window {
    index: i64,
    readings: u64,
    /// One per field, in `fields` order.
    fields: Vec<Acc>,
}

/// One field's accumulators in one window.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Acc {
    count: u64,
    sum: f64,
    min: f64,
    max: f64,
    last: f64,
}

impl Default for Acc {
    fn default() -> Self {
        Acc {
            count: 0,
            sum: 0.0,
            min: f64::INFINITY,
            max: f64::NEG_INFINITY,
            last: f64::NAN,
        }
    }
}

impl Acc {
    fn add(&mut self, value: f64) {
        self.count += 1;
        self.sum += value;
        self.min = self.min.min(value);
        self.max = self.max.max(value);
        self.last = value;
    }

    /// The function's value; `null` for avg/min/max/last of no values (and for a
    /// sum too large for a double).
    fn get(&self, function: Function) -> Value {
        let number = |n: f64| serde_json::Number::from_f64(n).map_or(Value::Null, Value::Number);
        if self.count == 0 {
            return match function {
                Function::Count => Value::from(0),
                Function::Sum => Value::from(0.0),
                _ => Value::Null,
            };
        }
        match function {
            Function::Avg => number(self.sum / self.count as f64),
            Function::Min => number(self.min),
            Function::Max => number(self.max),
            Function::Sum => number(self.sum),
            Function::Count => Value::from(self.count),
            Function::Last => number(self.last),
        }
    }
}

impl Aggregate {
    fn every_ms(&self) -> i64 {
        self.every.num_milliseconds().max(1)
    }

    /// The window a time falls in.
    fn index(&self, time: DateTime<Utc>) -> i64 {
        time.timestamp_millis().div_euclid(self.every_ms())
    }

    /// `(start, end)` of window `index`.
    fn bounds(&self, index: i64) -> (DateTime<Utc>, DateTime<Utc>) {
        let at = |ms: i64| DateTime::from_timestamp_millis(ms).unwrap_or(DateTime::<Utc>::MAX_UTC);
        let start = index.saturating_mul(self.every_ms());
        (at(start), at(start.saturating_add(self.every_ms())))
    }

    /// The `window` event for a closed window.
    fn close(
        &self,
        fx: &Effects<'_>,
        device: &str,
        source: &str,
        window: &Window,
        out: &mut Outcome,
    ) {
        let (start, end) = self.bounds(window.index);
        let mut data = Map::new();
        let mut bounds = Map::new();
        bounds.insert("start".into(), time_value(start));
        bounds.insert("end".into(), time_value(end));
        data.insert("window".into(), Value::Object(bounds));
        data.insert("readings".into(), Value::from(window.readings));
        let mut aggregates = Map::new();
        for (field, acc) in self.fields.iter().zip(&window.fields) {
            let values: Map<String, Value> = self
                .functions
                .iter()
                .map(|&f| (f.name().to_owned(), acc.get(f)))
                .collect();
            aggregates.insert(field.name.clone(), Value::Object(values));
        }
        data.insert("aggregates".into(), Value::Object(aggregates));
        fx.transition(
            out,
            Event {
                transition: Transition::Window,
                device,
                source,
                time: end,
                data,
            },
        );
    }

    pub(crate) fn evaluate(
        &mut self,
        fx: &Effects<'_>,
        reading: &Reading<'_>,
        limit: usize,
        out: &mut Outcome,
    ) {
        let index = self.index(reading.time);
        let mut state = match self.devices.get_or_insert_with(
            reading.device,
            reading.source,
            limit,
            State::default,
        ) {
            Ok(tracked) => std::mem::take(&mut tracked.state),
            Err(Untracked::Full(message)) => {
                if let Some(message) = message {
                    fx.error(out, message);
                }
                return;
            }
        };
        if let Some(open) = state.open.take_if(|open| open.index < index) {
            self.close(fx, reading.device, reading.source, &open, out);
            state.closed_through = Some(open.index);
        }
        let late = state.closed_through.is_some_and(|closed| index <= closed)
            || state.open.as_ref().is_some_and(|open| index < open.index);
        if late {
            let (start, end) = self.bounds(index);
            fx.error(
                out,
                format!(
                    "`aggregate`: reading at {} is late: its window {} to {} has already \
                     been sent; not aggregated",
                    time_text(reading.time),
                    time_text(start),
                    time_text(end)
                ),
            );
        } else {
            let fields = self.fields.len();
            let window = state.open.get_or_insert_with(|| Window {
                index,
                readings: 0,
                fields: vec![Acc::default(); fields],
            });
            window.readings += 1;
            let mut problems = Vec::new();
            for (field, acc) in self.fields.iter().zip(&mut window.fields) {
                match field.number(reading.fields) {
                    Ok(value) => acc.add(value),
                    Err(message) => problems.push(message),
                }
            }
            if !problems.is_empty() {
                fx.error(
                    out,
                    format!(
                        "`aggregate.fields`: {}; the other fields were aggregated",
                        problems.join("; ")
                    ),
                );
            }
            let end = self.bounds(window.index).1;
            self.next_due = earliest(self.next_due, Some(end));
        }
        if let Some(tracked) = self.devices.get_mut(reading.device) {
            tracked.state = state;
        }
    }

    pub(crate) fn tick(&mut self, fx: &Effects<'_>, now: DateTime<Utc>, out: &mut Outcome) {
        if self.next_due.is_none_or(|due| due > now) {
            return;
        }
        let mut due: Vec<(DateTime<Utc>, String)> = self
            .devices
            .iter()
            .filter_map(|(device, t)| {
                let end = self.bounds(t.state.open.as_ref()?.index).1;
                (end <= now).then(|| (end, device.clone()))
            })
            .collect();
        due.sort();
        for (_, device) in due {
            let Some(tracked) = self.devices.get_mut(&device) else {
                continue;
            };
            let Some(open) = tracked.state.open.take() else {
                continue;
            };
            tracked.state.closed_through = Some(open.index);
            let source = tracked.source.clone();
            self.close(fx, &device, &source, &open, out);
        }
        self.next_due = self.recompute_due();
    }

    fn recompute_due(&self) -> Option<DateTime<Utc>> {
        self.devices
            .iter()
            .filter_map(|(_, t)| Some(self.bounds(t.state.open.as_ref()?.index).1))
            .min()
    }

    pub(crate) fn adopt(&mut self, previous: &mut Aggregate) {
        self.devices = std::mem::take(&mut previous.devices);
        self.next_due = self.recompute_due();
    }
}

fn time_text(time: DateTime<Utc>) -> String {
    time.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true)
}
