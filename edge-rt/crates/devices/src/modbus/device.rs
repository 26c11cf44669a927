//! One Modbus device: its properties grouped into as few reads as their
//! addresses allow ([`plan`]), each group read on its collect cycle through
//! the device's line, desired values checked and written, and what
//! happened sent to the manager as [`Event`]s.

use std::time::Duration;

use crate::mailbox::{recv, Events, Receiver};
use outrigger_proto::device::{
    Access, DeviceModelSpec, DeviceSpec, Modbus, ModelProperty, PropertyType, Protocol, Register,
    Table, Transport, Value,
};
use tokio::time::Instant;

use super::bus::{Bus, BusError, LineConfig, Op, Reply};
use super::codec;
use crate::{Command, Event};

/// Registers (or bits) two properties may lie apart and still be read
/// together: reading a few unused ones is cheaper than another frame.
const MAX_GAP: u16 = 8;

/// A property as the device task sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct Point {
    pub name: String,
    pub model: ModelProperty,
    pub register: Register,
    pub cycle: Duration,
}

/// One read request and the points it serves.
#[derive(Debug, Clone, PartialEq)]
pub struct Read {
    pub table: Table,
    pub address: u16,
    pub count: u16,
    pub cycle: Duration,
    /// Indexes into the device's points.
    pub points: Vec<usize>,
}

/// The most one request may read: 125 registers or 2000 bits.
fn limit(t: Table) -> u32 {
    if t.bits() {
        2000
    } else {
        125
    }
}

fn span(p: &Point) -> u16 {
    if p.register.table.bits() {
        1
    } else {
        p.register.data_type.registers(p.register.count)
    }
}

/// Points grouped into reads: the same table and cycle, near each other,
/// within what one request may read.
pub fn plan(points: &[Point]) -> Vec<Read> {
    let mut order: Vec<usize> = (0..points.len()).collect();
    order.sort_by_key(|i| {
        let p = &points[*i];
        (p.cycle, p.register.table as u8, p.register.address)
    });
    let mut out: Vec<Read> = Vec::new();
    for i in order {
        let p = &points[i];
        let (start, end) = (
            u32::from(p.register.address),
            u32::from(p.register.address) + u32::from(span(p)),
        );
        if let Some(r) = out.last_mut().filter(|r| {
            r.table == p.register.table
                && r.cycle == p.cycle
                && start <= u32::from(r.address) + u32::from(r.count) + u32::from(MAX_GAP)
                && end - u32::from(r.address) <= limit(r.table)
        }) {
            let have = u32::from(r.address) + u32::from(r.count);
            r.count = (end.max(have) - u32::from(r.address)) as u16;
            r.points.push(i);
            continue;
        }
        out.push(Read {
            table: p.register.table,
            address: p.register.address,
            count: (end - start) as u16,
            cycle: p.cycle,
            points: vec![i],
        });
    }
    out
}

/// A Modbus device the manager runs.
#[derive(Debug, Clone)]
pub struct ModbusDevice {
    pub line: LineConfig,
    pub slave: u8,
    pub timeout: Duration,
    pub points: Vec<Point>,
}

impl ModbusDevice {
    /// The device as its spec and model say (already checked with
    /// `outrigger_proto::device::check`); None if it is not a Modbus one.
    pub fn new(spec: &DeviceSpec, model: &DeviceModelSpec) -> Option<ModbusDevice> {
        let Protocol::Modbus(Modbus {
            transport,
            slave_id,
            timeout_ms,
        }) = &spec.protocol
        else {
            return None;
        };
        let line = match transport {
            Transport::Rtu(l) => LineConfig::Serial(l.clone()),
            Transport::Tcp(t) => LineConfig::Tcp(t.clone()),
        };
        let points = spec
            .properties
            .iter()
            .filter_map(|p| {
                Some(Point {
                    name: p.name.clone(),
                    model: model.property(&p.name)?.clone(),
                    register: p.modbus.clone()?,
                    cycle: p.collect_cycle(),
                })
            })
            .collect();
        Some(ModbusDevice {
            line,
            slave: *slave_id,
            timeout: Duration::from_millis((*timeout_ms).into()),
            points,
        })
    }

    fn point(&self, name: &str) -> Option<&Point> {
        self.points.iter().find(|p| p.name == name)
    }

    /// A value as the device will hold it (its registers' resolution), as
    /// text: what a read returns once the value is written.
    pub fn normalize(&self, name: &str, v: &Value) -> Result<String, String> {
        let p = self
            .point(name)
            .ok_or_else(|| format!("no property {name:?} on this device"))?;
        if p.register.table.bits() {
            let on = v.as_f64().is_some_and(|x| x != 0.0);
            return Ok(fit(Value::Bool(on), p.model.type_).to_string());
        }
        let w = codec::encode(&p.register, v).map_err(|e| e.to_string())?;
        codec::decode(&p.register, p.model.type_, &w)
            .map(|v| v.to_string())
            .map_err(|e| e.to_string())
    }

    /// The request that writes `text` to property `name`, or why it must
    /// not be written.
    pub fn write_op(&self, name: &str, text: &str) -> Result<Op, String> {
        let p = self
            .point(name)
            .ok_or_else(|| format!("no property {name:?} on this device"))?;
        // ReadOnly first, then a table that takes no writes, then the value.
        if p.model.access == Access::ReadWrite && !p.register.table.writable() {
            return Err(format!("a {:?} cannot be written", p.register.table));
        }
        let v = outrigger_proto::device::check_writable(&p.model, name, text)?;
        if p.register.table == Table::Coil {
            let on = v.as_f64().is_some_and(|x| x != 0.0);
            return Ok(Op::WriteCoil {
                address: p.register.address,
                value: on,
            });
        }
        let words = codec::encode(&p.register, &v).map_err(|e| e.to_string())?;
        Ok(Op::WriteRegisters {
            address: p.register.address,
            words,
        })
    }
}

/// A read's answer, point by point.
fn decode(dev: &ModbusDevice, read: &Read, reply: &Reply) -> Vec<Event> {
    read.points
        .iter()
        .map(|i| {
            let p = &dev.points[*i];
            let off = usize::from(p.register.address - read.address);
            let r = match reply {
                Reply::Bits(b) => b
                    .get(off)
                    .map(|b| Value::Bool(*b))
                    .ok_or_else(|| "answer too short".to_string()),
                Reply::Words(w) => {
                    let n = usize::from(span(p));
                    w.get(off..off + n)
                        .ok_or_else(|| "answer too short".to_string())
                        .and_then(|w| {
                            codec::decode(&p.register, p.model.type_, w).map_err(|e| e.to_string())
                        })
                }
                Reply::Written => Err("no values in the answer".into()),
            };
            match r {
                Ok(value) => Event::Value {
                    property: p.name.clone(),
                    value: fit(value, p.model.type_),
                },
                Err(error) => Event::ReadFailed {
                    property: p.name.clone(),
                    error,
                },
            }
        })
        .collect()
}

/// A coil read for a property the model calls an int: 0 or 1.
fn fit(v: Value, ty: PropertyType) -> Value {
    match (v, ty) {
        (Value::Bool(b), PropertyType::Int) => Value::Int(i64::from(b)),
        (Value::Bool(b), PropertyType::Float) => Value::Float(f64::from(u8::from(b))),
        (v, _) => v,
    }
}

fn contact(r: &Result<Reply, BusError>, latency: Duration) -> Event {
    match r {
        Ok(_) => Event::Contact {
            ok: true,
            reason: "Answering",
            message: String::new(),
            latency,
        },
        Err(e) => Event::Contact {
            ok: false,
            reason: e.reason(),
            message: e.to_string(),
            latency,
        },
    }
}

/// Poll and write until the manager drops its end of `commands`.
pub async fn run(dev: ModbusDevice, bus: Bus, mut commands: Receiver<Command>, events: Events) {
    let reads = plan(&dev.points);
    let mut due: Vec<Instant> = vec![Instant::now(); reads.len()];
    loop {
        let next = due.iter().copied().min();
        let cmd = tokio::select! {
            c = recv(&mut commands) => match c {
                Some(c) => Some(c),
                None => return,
            },
            _ = async {
                match next {
                    Some(t) => tokio::time::sleep_until(t).await,
                    None => std::future::pending().await,
                }
            } => None,
        };
        if let Some(Command::Write { property, value }) = cmd {
            let op = match dev.write_op(&property, &value) {
                Ok(op) => op,
                Err(error) => {
                    let _ = events
                        .send(Event::WriteFailed {
                            property,
                            value,
                            error,
                        })
                        .await;
                    continue;
                }
            };
            let t0 = Instant::now();
            // Boxed, and the reply scoped to this block: a device task
            // idles holding only what it needs between polls (there may be
            // hundreds; see crate::mailbox).
            let r = Box::pin(bus.call(dev.slave, dev.timeout, op)).await;
            let answered = contact(&r, t0.elapsed());
            let ev = match r {
                Ok(_) => {
                    // Read it back at once: the reported value follows.
                    for (i, read) in reads.iter().enumerate() {
                        if read.points.iter().any(|p| dev.points[*p].name == property) {
                            due[i] = Instant::now();
                        }
                    }
                    Event::Wrote { property, value }
                }
                Err(e) => Event::WriteFailed {
                    property,
                    value,
                    error: e.to_string(),
                },
            };
            let _ = events.send(answered).await;
            if events.send(ev).await.is_err() {
                return;
            }
            continue;
        }
        let now = Instant::now();
        for (i, read) in reads.iter().enumerate() {
            if due[i] > now {
                continue;
            }
            // The next one a cycle after this one was due, not after it
            // finished: a slow line does not drift the cycle.
            due[i] = (due[i] + read.cycle).max(now);
            let t0 = Instant::now();
            let out = {
                let r = Box::pin(bus.call(
                    dev.slave,
                    dev.timeout,
                    Op::Read {
                        table: read.table,
                        address: read.address,
                        count: read.count,
                    },
                ))
                .await;
                let mut out = vec![contact(&r, t0.elapsed())];
                match &r {
                    Ok(reply) => out.extend(decode(&dev, read, reply)),
                    Err(e) => out.extend(read.points.iter().map(|p| Event::ReadFailed {
                        property: dev.points[*p].name.clone(),
                        error: e.to_string(),
                    })),
                }
                out
            };
            for e in out {
                if events.send(e).await.is_err() {
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use outrigger_proto::device::{DataType, Order};

    fn point(name: &str, table: Table, address: u16, dt: DataType, cycle_ms: u64) -> Point {
        Point {
            name: name.into(),
            model: ModelProperty {
                name: name.into(),
                type_: PropertyType::Float,
                access: Access::ReadWrite,
                unit: None,
                minimum: Some(0.0),
                maximum: Some(100.0),
                description: None,
            },
            register: Register {
                table,
                address,
                data_type: dt,
                count: None,
                byte_order: Order::BigEndian,
                word_order: Order::BigEndian,
                scale: 1.0,
                offset: 0.0,
            },
            cycle: Duration::from_millis(cycle_ms),
        }
    }

    #[test]
    fn neighbours_are_read_together_and_others_apart() {
        let pts = vec![
            point("a", Table::HoldingRegister, 0, DataType::Uint16, 1000),
            point("b", Table::HoldingRegister, 2, DataType::Float32, 1000),
            // Too far from b: a read of its own.
            point("c", Table::HoldingRegister, 40, DataType::Uint16, 1000),
            // Another table.
            point("d", Table::InputRegister, 1, DataType::Uint16, 1000),
            // Another cycle.
            point("e", Table::HoldingRegister, 1, DataType::Uint16, 200),
        ];
        let r = plan(&pts);
        let got: Vec<(Table, u16, u16, Vec<usize>)> = r
            .iter()
            .map(|r| (r.table, r.address, r.count, r.points.clone()))
            .collect();
        assert_eq!(
            got,
            vec![
                (Table::HoldingRegister, 1, 1, vec![4]),
                (Table::InputRegister, 1, 1, vec![3]),
                (Table::HoldingRegister, 0, 4, vec![0, 1]),
                (Table::HoldingRegister, 40, 1, vec![2]),
            ]
        );
    }

    #[test]
    fn a_read_never_exceeds_what_one_request_may_carry() {
        let pts: Vec<Point> = (0..100)
            .map(|i| {
                point(
                    &format!("p{i}"),
                    Table::HoldingRegister,
                    i * 4,
                    DataType::Float64,
                    1000,
                )
            })
            .collect();
        for r in plan(&pts) {
            assert!(r.count <= 125, "{r:?}");
        }
        assert_eq!(
            plan(&pts).iter().map(|r| r.points.len()).sum::<usize>(),
            100
        );
    }

    #[test]
    fn decoding_picks_each_points_registers_out_of_the_answer() {
        let dev = ModbusDevice {
            line: LineConfig::Tcp(outrigger_proto::device::TcpTarget {
                host: "127.0.0.1".into(),
                port: 502,
            }),
            slave: 1,
            timeout: Duration::from_secs(1),
            points: vec![
                point("a", Table::HoldingRegister, 10, DataType::Uint16, 1000),
                point("b", Table::HoldingRegister, 12, DataType::Float32, 1000),
            ],
        };
        let reads = plan(&dev.points);
        assert_eq!(reads.len(), 1);
        let ev = decode(&dev, &reads[0], &Reply::Words(vec![7, 0, 0x41AC, 0]));
        assert_eq!(
            ev,
            vec![
                Event::Value {
                    property: "a".into(),
                    value: Value::Float(7.0)
                },
                Event::Value {
                    property: "b".into(),
                    value: Value::Float(21.5)
                },
            ]
        );
        // Writes are checked before anything goes on the line.
        assert!(dev
            .write_op("a", "101")
            .unwrap_err()
            .contains("above the maximum"));
        assert!(dev.write_op("zz", "1").is_err());
        assert!(matches!(
            dev.write_op("b", "21.5"),
            Ok(Op::WriteRegisters { address: 12, .. })
        ));
    }
}
