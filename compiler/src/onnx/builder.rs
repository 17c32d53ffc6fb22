//! A small ONNX graph builder: named nodes, deduplicated constants and deferred weights.

use std::collections::HashMap;

use super::nbits::{self, Part};
use super::proto::{
    attribute_type, tensor_shape_proto, type_proto, AttributeProto, NodeProto, TensorProto,
    TensorShapeProto, TypeProto, ValueInfoProto, FLOAT, INT64, UINT8,
};
use crate::graph::Tensor;

/// One dimension of a graph input or output.
#[derive(Clone, Copy, Debug)]
pub enum Dim {
    Fixed(usize),
    Symbol(&'static str),
}

/// How a checkpoint tensor is laid out as an initializer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    /// f32, in the source's shape.
    F32,
    /// f32 `[in, out]` (the `[out, in]` source transposed) so that `MatMul(x, w)` projects.
    F32Transposed,
    /// One input of `MatMulNBits`, from a block-format source.
    NBits(Part),
}

/// A checkpoint tensor that becomes an initializer; its bytes are produced only when the file
/// is written, so a whole model never sits in memory converted at once.
#[derive(Clone, Debug)]
pub struct Weight<'a> {
    pub name: String,
    pub source: &'a Tensor,
    pub layout: Layout,
}

impl Weight<'_> {
    /// The initializer's dimensions.
    pub fn dims(&self) -> Vec<i64> {
        let dims = self.source.shape.iter().map(|&d| d as i64);
        match self.layout {
            Layout::F32 => dims.collect(),
            Layout::F32Transposed => dims.rev().collect(),
            Layout::NBits(part) => nbits::dims(self.source, part),
        }
    }

    /// The initializer's `TensorProto.DataType`.
    pub fn data_type(&self) -> i32 {
        match self.layout {
            Layout::NBits(Part::B) => UINT8,
            _ => FLOAT,
        }
    }

    /// Size of the data in bytes.
    pub fn byte_len(&self) -> u64 {
        match self.layout {
            Layout::F32 | Layout::F32Transposed => {
                self.source.shape.iter().product::<usize>() as u64 * 4
            }
            Layout::NBits(part) => nbits::byte_len(self.source, part),
        }
    }

    /// The data, little-endian, in the initializer's layout.
    pub fn le_bytes(&self) -> Vec<u8> {
        let values = self.source.to_f32();
        let values = match self.layout {
            Layout::F32 => values,
            Layout::F32Transposed => values.reversed_axes().as_standard_layout().into_owned(),
            Layout::NBits(part) => return nbits::le_bytes(self.source, part),
        };
        let mut out = Vec::with_capacity(values.len() * 4);
        for v in values.iter() {
            out.extend_from_slice(&v.to_le_bytes());
        }
        out
    }
}

/// An integer attribute.
pub fn attr_i(name: &str, value: i64) -> AttributeProto {
    AttributeProto {
        name: Some(name.to_owned()),
        r#type: Some(attribute_type::INT),
        i: Some(value),
        ..Default::default()
    }
}

/// An integer-list attribute.
pub fn attr_ints(name: &str, values: &[i64]) -> AttributeProto {
    AttributeProto {
        name: Some(name.to_owned()),
        r#type: Some(attribute_type::INTS),
        ints: values.to_vec(),
        ..Default::default()
    }
}

/// A tensor value description for a graph input or output.
pub fn value_info(name: &str, elem_type: i32, dims: &[Dim]) -> ValueInfoProto {
    let dim = dims
        .iter()
        .map(|d| tensor_shape_proto::Dimension {
            value: Some(match *d {
                Dim::Fixed(n) => tensor_shape_proto::dimension::Value::DimValue(n as i64),
                Dim::Symbol(s) => tensor_shape_proto::dimension::Value::DimParam(s.to_owned()),
            }),
        })
        .collect();
    ValueInfoProto {
        name: Some(name.to_owned()),
        r#type: Some(TypeProto {
            value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                elem_type: Some(elem_type),
                shape: Some(TensorShapeProto { dim }),
            })),
        }),
    }
}

/// Accumulates nodes, inline constants and weights; nodes are named `/{scope}/{Op}_{n}` and
/// their outputs `{node}_output_{k}`, as exporters in the ecosystem do.
#[derive(Default)]
pub struct GraphBuilder<'a> {
    pub nodes: Vec<NodeProto>,
    /// Small constants (shapes, axes, scalars, RoPE frequencies), always stored inline.
    pub constants: Vec<TensorProto>,
    pub weights: Vec<Weight<'a>>,
    scope: String,
    counts: HashMap<String, usize>,
    constant_names: HashMap<(i32, Vec<i64>, Vec<u8>), String>,
}

impl<'a> GraphBuilder<'a> {
    /// Sets the prefix of the names of the nodes added next.
    pub fn set_scope(&mut self, scope: &str) {
        self.scope = scope.to_owned();
    }

    fn node_name(&mut self, op: &str) -> String {
        let base = format!("/{}/{}", self.scope, op);
        let n = self.counts.entry(base.clone()).or_insert(0);
        let name = if *n == 0 { base } else { format!("{base}_{n}") };
        *n += 1;
        name
    }

    /// Adds a node with `outputs` outputs named after the node.
    pub fn op_n(
        &mut self,
        op: &str,
        inputs: &[&str],
        attributes: Vec<AttributeProto>,
        outputs: usize,
    ) -> Vec<String> {
        let name = self.node_name(op);
        let outputs: Vec<String> = (0..outputs).map(|k| format!("{name}_output_{k}")).collect();
        self.push(op, name, inputs, attributes, outputs.clone());
        outputs
    }

    /// Adds a single-output node and returns its output's name.
    pub fn op(&mut self, op: &str, inputs: &[&str], attributes: Vec<AttributeProto>) -> String {
        let name = self.node_name(op);
        let output = format!("{name}_output_0");
        self.push(op, name, inputs, attributes, vec![output.clone()]);
        output
    }

    /// A single-output node of an operator of `domain` rather than ai.onnx; its output is
    /// the graph value `output` if given, else named after the node. Returns the output.
    pub fn op_in(
        &mut self,
        domain: &str,
        op: &str,
        inputs: &[&str],
        attributes: Vec<AttributeProto>,
        output: Option<&str>,
    ) -> String {
        let name = self.node_name(op);
        let output = output.map_or_else(|| format!("{name}_output_0"), str::to_owned);
        self.push(op, name, inputs, attributes, vec![output.clone()]);
        if let Some(node) = self.nodes.last_mut() {
            node.domain = Some(domain.to_owned());
        }
        output
    }

    /// Whether any node is of `domain`.
    pub fn uses_domain(&self, domain: &str) -> bool {
        self.nodes
            .iter()
            .any(|n| n.domain.as_deref() == Some(domain))
    }

    /// Adds a single-output node whose output is the graph value `output`.
    pub fn op_to(
        &mut self,
        op: &str,
        inputs: &[&str],
        attributes: Vec<AttributeProto>,
        output: &str,
    ) {
        let name = self.node_name(op);
        self.push(op, name, inputs, attributes, vec![output.to_owned()]);
    }

    fn push(
        &mut self,
        op: &str,
        name: String,
        inputs: &[&str],
        attribute: Vec<AttributeProto>,
        output: Vec<String>,
    ) {
        self.nodes.push(NodeProto {
            input: inputs.iter().map(|s| (*s).to_owned()).collect(),
            output,
            name: Some(name),
            op_type: Some(op.to_owned()),
            domain: None,
            attribute,
        });
    }

    fn constant(&mut self, data_type: i32, dims: Vec<i64>, raw: Vec<u8>, label: String) -> String {
        let key = (data_type, dims, raw);
        if let Some(name) = self.constant_names.get(&key) {
            return name.clone();
        }
        // Labels derive from the values (or are unique names), so they never collide.
        let name = format!("/const/{label}");
        self.constants.push(TensorProto {
            dims: key.1.clone(),
            data_type: Some(data_type),
            name: Some(name.clone()),
            raw_data: Some(key.2.clone()),
            external_data: Vec::new(),
            data_location: None,
        });
        self.constant_names.insert(key, name.clone());
        name
    }

    /// An int64 1-D constant.
    pub fn ints(&mut self, values: &[i64]) -> String {
        let raw = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        let label = format!("i64{values:?}").replace(' ', "");
        self.constant(INT64, vec![values.len() as i64], raw, label)
    }

    /// An int64 scalar constant.
    pub fn int(&mut self, value: i64) -> String {
        self.constant(
            INT64,
            Vec::new(),
            value.to_le_bytes().to_vec(),
            format!("i64_{value}"),
        )
    }

    /// An f32 scalar constant.
    pub fn float(&mut self, value: f32) -> String {
        self.constant(
            FLOAT,
            Vec::new(),
            value.to_le_bytes().to_vec(),
            format!("f32_{value:e}"),
        )
    }

    /// A named f32 1-D constant.
    pub fn floats(&mut self, name: &str, values: &[f32]) -> String {
        let raw = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.constant(FLOAT, vec![values.len() as i64], raw, name.to_owned())
    }

    /// Registers a checkpoint tensor as an f32 initializer named `name`, transposed or not.
    pub fn weight(&mut self, name: &str, source: &'a Tensor, transpose: bool) -> String {
        let layout = if transpose {
            Layout::F32Transposed
        } else {
            Layout::F32
        };
        self.weight_as(name, source, layout)
    }

    /// Registers a checkpoint tensor as an initializer named `name` in `layout`; registering
    /// the same tensor in the same layout again returns the first registration's name.
    pub fn weight_as(&mut self, name: &str, source: &'a Tensor, layout: Layout) -> String {
        let same = |w: &Weight| w.name == name && std::ptr::eq(w.source, source);
        if self.weights.iter().any(|w| same(w) && w.layout == layout) {
            return name.to_owned();
        }
        self.weights.push(Weight {
            name: name.to_owned(),
            source,
            layout,
        });
        name.to_owned()
    }
}
