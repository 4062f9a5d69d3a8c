//! Deserializing a section whose values may come from the environment.
//!
//! An environment value is text. It is offered to the field as what the field asks for: a field
//! that wants a string gets the text as it is (`SWITCHBOARD__GUARD__HASH_SECRET=1234567890123456`
//! is a string, not an integer), any other field gets the value the text parses to as TOML (a
//! number, a boolean, an array), else the text. And an error about a value from the environment
//! never shows the value (it may be a secret): only its type, what was expected and the variable.

use std::fmt::{self, Display};

use serde::de::{
    self, Deserializer, Expected, IntoDeserializer, Unexpected, Visitor,
    value::{MapDeserializer, SeqDeserializer},
};

/// A section's tree: the file's values, and the environment's at their paths.
pub(crate) enum Node {
    /// A value of the file (no environment value below it).
    File(toml::Value),
    /// A table with an environment value somewhere below it.
    Table(Vec<(String, Node)>),
    /// An environment value: its text and, when the text is TOML, what it parses to.
    Env {
        raw: String,
        typed: Option<toml::Value>,
    },
}

impl Node {
    /// Puts the environment value `raw` (TOML `typed`) at `path` below this node.
    pub(crate) fn overlay(&mut self, path: &[String], raw: &str, typed: Option<toml::Value>) {
        let Some((first, rest)) = path.split_first() else {
            *self = Node::Env {
                raw: raw.to_owned(),
                typed,
            };
            return;
        };
        let entries = match self {
            Node::Table(entries) => entries,
            other => {
                let entries = match std::mem::replace(other, Node::Table(Vec::new())) {
                    Node::File(toml::Value::Table(table)) => table
                        .into_iter()
                        .map(|(key, value)| (key, Node::File(value)))
                        .collect(),
                    _ => Vec::new(),
                };
                *other = Node::Table(entries);
                match other {
                    Node::Table(entries) => entries,
                    _ => return,
                }
            }
        };
        match entries.iter_mut().find(|(key, _)| key == first) {
            Some((_, node)) => node.overlay(rest, raw, typed),
            None => {
                let mut node = Node::Table(Vec::new());
                node.overlay(rest, raw, typed);
                entries.push((first.clone(), node));
            }
        }
    }
}

/// An error while deserializing a [`Node`].
#[derive(Debug)]
pub(crate) struct Error(pub(crate) String);

impl Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Error {}

impl de::Error for Error {
    fn custom<T: Display>(msg: T) -> Self {
        Error(msg.to_string())
    }
}

/// The error of an environment value: never shows the value.
#[derive(Debug)]
struct Redacted(String);

impl Display for Redacted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Redacted {}

impl de::Error for Redacted {
    fn custom<T: Display>(msg: T) -> Self {
        Redacted(msg.to_string())
    }

    fn invalid_type(unexpected: Unexpected<'_>, expected: &dyn Expected) -> Self {
        Redacted(format!(
            "invalid type: {}, expected {expected}",
            kind(&unexpected)
        ))
    }

    fn invalid_value(unexpected: Unexpected<'_>, expected: &dyn Expected) -> Self {
        Redacted(format!(
            "invalid value ({} not shown), expected {expected}",
            kind(&unexpected)
        ))
    }

    fn unknown_variant(_variant: &str, expected: &'static [&'static str]) -> Self {
        Redacted(format!(
            "unknown variant (not shown), expected one of {}",
            expected
                .iter()
                .map(|v| format!("`{v}`"))
                .collect::<Vec<_>>()
                .join(", ")
        ))
    }

    fn unknown_field(_field: &str, expected: &'static [&'static str]) -> Self {
        Redacted(format!(
            "unknown field (not shown), expected one of {}",
            expected
                .iter()
                .map(|v| format!("`{v}`"))
                .collect::<Vec<_>>()
                .join(", ")
        ))
    }
}

impl From<Redacted> for Error {
    fn from(error: Redacted) -> Self {
        Error(error.0)
    }
}

/// What kind of value `unexpected` is, without the value.
fn kind(unexpected: &Unexpected<'_>) -> &'static str {
    match unexpected {
        Unexpected::Bool(_) => "boolean",
        Unexpected::Unsigned(_) | Unexpected::Signed(_) => "integer",
        Unexpected::Float(_) => "float",
        Unexpected::Char(_) => "character",
        Unexpected::Str(_) => "string",
        Unexpected::Bytes(_) => "byte array",
        Unexpected::Unit => "unit value",
        Unexpected::Option => "optional value",
        Unexpected::NewtypeStruct => "newtype struct",
        Unexpected::Seq => "sequence",
        Unexpected::Map => "map",
        Unexpected::Enum => "enum",
        Unexpected::UnitVariant => "unit variant",
        Unexpected::NewtypeVariant => "newtype variant",
        Unexpected::TupleVariant => "tuple variant",
        Unexpected::StructVariant => "struct variant",
        Unexpected::Other(_) => "value",
    }
}

/// Every `deserialize_*` method but `deserialize_any`, with its extra arguments.
macro_rules! each_method {
    ($m:ident) => {
        $m! {
            deserialize_bool();
            deserialize_i8();
            deserialize_i16();
            deserialize_i32();
            deserialize_i64();
            deserialize_i128();
            deserialize_u8();
            deserialize_u16();
            deserialize_u32();
            deserialize_u64();
            deserialize_u128();
            deserialize_f32();
            deserialize_f64();
            deserialize_char();
            deserialize_str();
            deserialize_string();
            deserialize_bytes();
            deserialize_byte_buf();
            deserialize_option();
            deserialize_unit();
            deserialize_unit_struct(name: &'static str);
            deserialize_newtype_struct(name: &'static str);
            deserialize_seq();
            deserialize_tuple(len: usize);
            deserialize_tuple_struct(name: &'static str, len: usize);
            deserialize_map();
            deserialize_struct(name: &'static str, fields: &'static [&'static str]);
            deserialize_enum(name: &'static str, variants: &'static [&'static str]);
            deserialize_identifier();
            deserialize_ignored_any();
        }
    };
}

macro_rules! node_methods {
    ($($method:ident($($arg:ident: $ty:ty),*);)*) => {
        $(
            fn $method<V: Visitor<'de>>(self, $($arg: $ty,)* visitor: V) -> Result<V::Value, Error> {
                match self {
                    Node::File(value) => value
                        .$method($($arg,)* visitor)
                        .map_err(|e| Error(e.to_string())),
                    Node::Table(entries) => TableDe(entries).$method($($arg,)* visitor),
                    Node::Env { raw, typed } => Ok(EnvLeaf { raw, typed }.$method($($arg,)* visitor)?),
                }
            }
        )*
    };
}

impl<'de> Deserializer<'de> for Node {
    type Error = Error;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        match self {
            Node::File(value) => value
                .deserialize_any(visitor)
                .map_err(|e| Error(e.to_string())),
            Node::Table(entries) => TableDe(entries).deserialize_any(visitor),
            Node::Env { raw, typed } => Ok(EnvLeaf { raw, typed }.deserialize_any(visitor)?),
        }
    }

    each_method!(node_methods);
}

impl<'de> IntoDeserializer<'de, Error> for Node {
    type Deserializer = Node;

    fn into_deserializer(self) -> Node {
        self
    }
}

/// A table with an environment value below it.
struct TableDe(Vec<(String, Node)>);

impl<'de> Deserializer<'de> for TableDe {
    type Error = Error;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        let mut map = MapDeserializer::new(self.0.into_iter());
        let value = visitor.visit_map(&mut map)?;
        map.end()?;
        Ok(value)
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        visitor.visit_some(self)
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        visitor: V,
    ) -> Result<V::Value, Error> {
        visitor.visit_newtype_struct(self)
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf unit
        unit_struct seq tuple tuple_struct map struct enum identifier ignored_any
    }
}

/// An environment value.
struct EnvLeaf {
    raw: String,
    typed: Option<toml::Value>,
}

impl EnvLeaf {
    /// The text a string field gets: a TOML string's content (`"x"` is `x`), else the text as is.
    fn text(self) -> String {
        match self.typed {
            Some(toml::Value::String(text)) => text,
            _ => self.raw,
        }
    }
}

impl<'de> Deserializer<'de> for EnvLeaf {
    type Error = Redacted;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Redacted> {
        match self.typed {
            Some(typed) => EnvValue(typed).deserialize_any(visitor),
            None => visitor.visit_string(self.raw),
        }
    }

    fn deserialize_str<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Redacted> {
        visitor.visit_string(self.text())
    }

    fn deserialize_string<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Redacted> {
        visitor.visit_string(self.text())
    }

    fn deserialize_char<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Redacted> {
        visitor.visit_string(self.text())
    }

    fn deserialize_identifier<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Redacted> {
        visitor.visit_string(self.text())
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Redacted> {
        visitor.visit_some(self)
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        visitor: V,
    ) -> Result<V::Value, Redacted> {
        visitor.visit_newtype_struct(self)
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        name: &'static str,
        variants: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, Redacted> {
        match self.typed {
            Some(typed @ toml::Value::Table(_)) => {
                EnvValue(typed).deserialize_enum(name, variants, visitor)
            }
            typed => EnvLeaf {
                raw: self.raw,
                typed,
            }
            .text()
            .into_deserializer()
            .deserialize_enum(name, variants, visitor),
        }
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 bytes byte_buf unit
        unit_struct seq tuple tuple_struct map struct ignored_any
    }
}

/// A TOML value parsed from an environment value (or inside one).
struct EnvValue(toml::Value);

impl<'de> IntoDeserializer<'de, Redacted> for EnvValue {
    type Deserializer = EnvValue;

    fn into_deserializer(self) -> EnvValue {
        self
    }
}

impl<'de> Deserializer<'de> for EnvValue {
    type Error = Redacted;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Redacted> {
        match self.0 {
            toml::Value::String(text) => visitor.visit_string(text),
            toml::Value::Integer(i) => visitor.visit_i64(i),
            toml::Value::Float(f) => visitor.visit_f64(f),
            toml::Value::Boolean(b) => visitor.visit_bool(b),
            toml::Value::Datetime(d) => visitor.visit_string(d.to_string()),
            toml::Value::Array(items) => {
                let mut seq = SeqDeserializer::new(items.into_iter().map(EnvValue));
                let value = visitor.visit_seq(&mut seq)?;
                seq.end()?;
                Ok(value)
            }
            toml::Value::Table(table) => {
                let mut map =
                    MapDeserializer::new(table.into_iter().map(|(k, v)| (k, EnvValue(v))));
                let value = visitor.visit_map(&mut map)?;
                map.end()?;
                Ok(value)
            }
        }
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Redacted> {
        visitor.visit_some(self)
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        visitor: V,
    ) -> Result<V::Value, Redacted> {
        visitor.visit_newtype_struct(self)
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        name: &'static str,
        variants: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, Redacted> {
        match self.0 {
            toml::Value::String(text) => text
                .into_deserializer()
                .deserialize_enum(name, variants, visitor),
            toml::Value::Table(table) if table.len() == 1 => {
                let map = MapDeserializer::new(table.into_iter().map(|(k, v)| (k, EnvValue(v))));
                visitor.visit_enum(de::value::MapAccessDeserializer::new(map))
            }
            other => EnvValue(other).deserialize_any(visitor),
        }
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf unit
        unit_struct seq tuple tuple_struct map struct identifier ignored_any
    }
}
