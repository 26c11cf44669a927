//! The example model: one linear unit with a sigmoid, written as ONNX by
//! `make-model` and run with tract by `run`.
//!
//! Input `readings`, float32 `[1, 4]`: the last four temperature readings
//! of a device, oldest first (°C). Output `score`, float32 `[1, 1]`:
//!
//! ```text
//! score = Sigmoid(readings · W + B)            (MatMul, Add, Sigmoid)
//!       = Sigmoid(LEVEL_GAIN * (latest - threshold) + SLOPE_GAIN * slope)
//! ```
//!
//! where `slope` is the least-squares slope of the four readings in °C per
//! reading: `(-3 r0 - r1 + r2 + 3 r3) / 10` (the readings at x = 0..3,
//! `(x - 1.5) / Σ(x - 1.5)²`). So
//!
//! ```text
//! W = SLOPE_GAIN * [-0.3, -0.1, 0.1, 0.3] + [0, 0, 0, LEVEL_GAIN]
//!   = [-0.3, -0.1, 0.1, 0.8]
//! B = -LEVEL_GAIN * threshold = -20          (threshold 40 °C)
//! ```
//!
//! Each °C of the latest reading above the threshold adds 0.5 to the
//! logit, each °C per reading of rise adds 1. Steady at 20 °C: logit -10,
//! score 0.00005. Rising 20, 30, 40, 50: logit 15, score 0.9999997. A
//! fast rise still below the threshold (20, 25, 30, 35: logit -2.5 + 5)
//! scores 0.92; steady at 45 °C (2.5) 0.92; steady at 38 °C (-1) 0.27.

use std::path::Path;

use anyhow::{bail, ensure, Context, Result};
use prost::Message;
use tract_onnx::pb::{
    tensor_proto::DataType, tensor_shape_proto::dimension, tensor_shape_proto::Dimension,
    type_proto, GraphProto, ModelProto, NodeProto, OperatorSetIdProto, TensorProto,
    TensorShapeProto, TypeProto, ValueInfoProto,
};
use tract_onnx::prelude::*;

/// Readings the model takes.
pub const WIDTH: usize = 4;
/// `make-model`'s default threshold, °C.
pub const DEFAULT_THRESHOLD: f32 = 40.0;
/// Logit per °C of the latest reading above the threshold.
pub const LEVEL_GAIN: f32 = 0.5;
/// Logit per °C per reading of the readings' least-squares slope.
pub const SLOPE_GAIN: f32 = 1.0;
/// The least-squares slope of four equally spaced readings.
const SLOPE: [f32; WIDTH] = [-0.3, -0.1, 0.1, 0.3];

pub const INPUT: &str = "readings";
pub const OUTPUT: &str = "score";
const OPSET: i64 = 13;
/// ONNX IR version 8 (ONNX 1.10 and later).
const IR_VERSION: i64 = 8;

/// `W`, `[4, 1]` row-major.
pub fn weights() -> [f32; WIDTH] {
    let mut w = SLOPE.map(|s| SLOPE_GAIN * s);
    w[WIDTH - 1] += LEVEL_GAIN;
    w
}

/// `B` for a threshold.
pub fn bias(threshold: f32) -> f32 {
    -LEVEL_GAIN * threshold
}

fn f32_type(dims: &[i64]) -> Option<TypeProto> {
    Some(TypeProto {
        denotation: String::new(),
        value: Some(type_proto::Value::TensorType(type_proto::Tensor {
            elem_type: DataType::Float as i32,
            shape: Some(TensorShapeProto {
                dim: dims
                    .iter()
                    .map(|&d| Dimension {
                        denotation: String::new(),
                        value: Some(dimension::Value::DimValue(d)),
                    })
                    .collect(),
            }),
        })),
    })
}

fn value(name: &str, dims: &[i64]) -> ValueInfoProto {
    ValueInfoProto {
        name: name.into(),
        r#type: f32_type(dims),
        doc_string: String::new(),
    }
}

fn constant(name: &str, dims: &[i64], data: &[f32]) -> TensorProto {
    TensorProto {
        name: name.into(),
        dims: dims.to_vec(),
        data_type: DataType::Float as i32,
        float_data: data.to_vec(),
        ..Default::default()
    }
}

fn node(op: &str, inputs: &[&str], output: &str) -> NodeProto {
    NodeProto {
        name: output.into(),
        op_type: op.into(),
        input: inputs.iter().map(|s| s.to_string()).collect(),
        output: vec![output.into()],
        ..Default::default()
    }
}

/// The model for `threshold` (°C), as ONNX protobuf bytes.
pub fn make(threshold: f32) -> Result<Vec<u8>> {
    ensure!(
        threshold.is_finite(),
        "the threshold must be a finite number of °C, not {threshold}"
    );
    let graph = GraphProto {
        name: "outrigger-temperature-alarm".into(),
        doc_string: format!(
            "score = Sigmoid(readings . W + B): {LEVEL_GAIN} per °C of the latest of 4 readings \
             above {threshold} °C, plus {SLOPE_GAIN} per °C/reading of their least-squares slope"
        ),
        node: vec![
            node("MatMul", &[INPUT, "W"], "logit_w"),
            node("Add", &["logit_w", "B"], "logit"),
            node("Sigmoid", &["logit"], OUTPUT),
        ],
        initializer: vec![
            constant("W", &[WIDTH as i64, 1], &weights()),
            constant("B", &[1], &[bias(threshold)]),
        ],
        input: vec![value(INPUT, &[1, WIDTH as i64])],
        output: vec![value(OUTPUT, &[1, 1])],
        ..Default::default()
    };
    let model = ModelProto {
        ir_version: IR_VERSION,
        opset_import: vec![OperatorSetIdProto {
            domain: String::new(),
            version: OPSET,
        }],
        producer_name: "edge-infer".into(),
        producer_version: env!("CARGO_PKG_VERSION").into(),
        graph: Some(graph),
        ..Default::default()
    };
    Ok(model.encode_to_vec())
}

/// The ONNX loader: with feature `all-ops` (the default) every operator
/// tract knows, so that any model shipped as an artifact loads; without
/// it only the example model's three, which halves the static binary
/// (a model using others fails to load, naming the operator).
#[cfg(feature = "all-ops")]
fn onnx() -> tract_onnx::Onnx {
    tract_onnx::onnx()
}

#[cfg(not(feature = "all-ops"))]
fn onnx() -> tract_onnx::Onnx {
    use tract_onnx::tract_hir::internal::*;
    use tract_onnx::tract_hir::ops;
    let mut o = tract_onnx::Onnx::default();
    let reg = &mut o.op_register;
    // As tract_onnx::ops registers them.
    reg.insert("MatMul", |_, _| {
        Ok((expand(ops::matmul::MatMulInference::default()), vec![]))
    });
    reg.insert("Add", |_, _| Ok((ops::math::Add.into_hir(), vec![])));
    reg.insert("Sigmoid", |_, _| {
        Ok((ops::nn::sigmoid().into_hir(), vec![]))
    });
    o
}

/// A model loaded and optimised once, run on every full window.
pub struct Scorer {
    plan: TypedRunnableModel<TypedModel>,
    width: usize,
}

impl Scorer {
    pub fn load(path: &Path) -> Result<Scorer> {
        let m = onnx()
            .model_for_path(path)
            .with_context(|| format!("loading ONNX model {}", path.display()))?;
        Scorer::new(m).with_context(|| format!("model {}", path.display()))
    }

    pub fn from_bytes(bytes: &[u8]) -> Result<Scorer> {
        let m = onnx()
            .model_for_read(&mut &bytes[..])
            .context("loading ONNX model")?;
        Scorer::new(m)
    }

    fn new(m: InferenceModel) -> Result<Scorer> {
        let m = m.into_optimized()?;
        ensure!(
            m.inputs.len() == 1 && m.outputs.len() == 1,
            "the model has {} inputs and {} outputs: one of each expected",
            m.inputs.len(),
            m.outputs.len()
        );
        let fact = m.input_fact(0)?;
        let width = match fact.shape.as_concrete() {
            Some(&[1, n]) if fact.datum_type == f32::datum_type() => n,
            _ => bail!("the model's input is {fact:?}: float32 [1, N] expected"),
        };
        Ok(Scorer {
            plan: m.into_runnable()?,
            width,
        })
    }

    /// How many readings the model takes.
    pub fn width(&self) -> usize {
        self.width
    }

    /// The score of `readings` (oldest first).
    pub fn score(&self, readings: &[f32]) -> Result<f32> {
        ensure!(
            readings.len() == self.width,
            "{} readings for a model of {}",
            readings.len(),
            self.width
        );
        let input = Tensor::from_shape(&[1, self.width], readings)?;
        let out = self.plan.run(tvec!(input.into()))?;
        let out = out.first().context("the model gave no output")?;
        let v = out.as_slice::<f32>()?;
        match v {
            [s] => Ok(*s),
            _ => bail!("the model gave {} values: one expected", v.len()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scorer() -> Scorer {
        Scorer::from_bytes(&make(DEFAULT_THRESHOLD).unwrap()).unwrap()
    }

    #[test]
    fn steady_normal_readings_score_low() {
        let s = scorer();
        assert_eq!(s.width(), WIDTH);
        let v = s.score(&[20.0, 20.0, 20.0, 20.0]).unwrap();
        assert!(v < 0.2, "{v}");
        let v = s.score(&[25.0, 24.5, 25.5, 25.0]).unwrap();
        assert!(v < 0.2, "{v}");
    }

    #[test]
    fn rising_or_high_readings_score_high() {
        let s = scorer();
        let v = s.score(&[20.0, 30.0, 40.0, 50.0]).unwrap();
        assert!(v > 0.8, "{v}");
        // A fast rise still below the threshold.
        let v = s.score(&[20.0, 25.0, 30.0, 35.0]).unwrap();
        assert!(v > 0.8, "{v}");
        // Steady, but above it.
        let v = s.score(&[45.0, 45.0, 45.0, 45.0]).unwrap();
        assert!(v > 0.8, "{v}");
    }

    #[test]
    fn the_model_computes_the_documented_formula() {
        let s = scorer();
        for r in [
            [20.0f32, 20.0, 20.0, 20.0],
            [38.0, 38.0, 38.0, 38.0],
            [30.0, 33.0, 35.0, 36.0],
        ] {
            let slope = (-3.0 * r[0] - r[1] + r[2] + 3.0 * r[3]) / 10.0;
            let logit = LEVEL_GAIN * (r[3] - DEFAULT_THRESHOLD) + SLOPE_GAIN * slope;
            let want = 1.0 / (1.0 + (-logit).exp());
            let got = s.score(&r).unwrap();
            assert!((got - want).abs() < 1e-5, "{r:?}: {got} != {want}");
        }
    }

    #[test]
    fn the_threshold_moves_the_bias() {
        let s = Scorer::from_bytes(&make(15.0).unwrap()).unwrap();
        assert!(s.score(&[20.0, 20.0, 20.0, 20.0]).unwrap() > 0.8);
        assert!(make(f32::NAN).is_err());
    }

    #[test]
    fn a_window_of_the_wrong_width_is_refused() {
        assert!(scorer().score(&[1.0, 2.0]).is_err());
    }
}
