//! Enrichment: parameterised SQL queries whose results ride along in an event.
//!
//! The row's values are bound as parameters in Postgres's text format, so the
//! server parses each one as whatever type the query gives the parameter
//! (integer, uuid, timestamp...), and no value is ever spliced into the SQL.

use std::error::Error;

use bytes::BytesMut;
use serde_json::Value;
use tokio_postgres::types::{Format, IsNull, ToSql, Type, to_sql_checked};

use super::Row;
use crate::config::Enrichment;

/// A query parameter sent as text for the server to parse.
#[derive(Debug)]
pub struct TextParameter(Option<String>);

impl TextParameter {
    pub fn from_json(value: Option<&Value>) -> TextParameter {
        let text = match value {
            None | Some(Value::Null) => None,
            Some(Value::String(text)) => Some(text.clone()),
            Some(Value::Number(number)) => Some(number.to_string()),
            Some(Value::Bool(flag)) => Some(flag.to_string()),
            Some(other) => Some(other.to_string()),
        };
        TextParameter(text)
    }
}

impl ToSql for TextParameter {
    fn to_sql(&self, _: &Type, out: &mut BytesMut) -> Result<IsNull, Box<dyn Error + Sync + Send>> {
        match &self.0 {
            None => Ok(IsNull::Yes),
            Some(text) => {
                out.extend_from_slice(text.as_bytes());
                Ok(IsNull::No)
            }
        }
    }

    fn accepts(_: &Type) -> bool {
        true
    }

    fn encode_format(&self, _: &Type) -> Format {
        Format::Text
    }

    to_sql_checked!();
}

/// Wraps the user's query so each result row arrives as one JSON object, with
/// numbers as numbers and timestamps as strings.
pub fn wrapped_sql(enrichment: &Enrichment) -> String {
    format!(
        "select to_jsonb(enrichment_row) from (\n{}\n) as enrichment_row",
        enrichment.sql
    )
}

/// Runs one enrichment query for a row and returns its rows as JSON objects.
/// `statement` is the query prepared with [`wrapped_sql`] on this connection.
pub async fn run(
    transaction: &tokio_postgres::Transaction<'_>,
    statement: &tokio_postgres::Statement,
    enrichment: &Enrichment,
    row: &Row,
) -> Result<Vec<Value>, tokio_postgres::Error> {
    let parameters: Vec<TextParameter> = enrichment
        .params
        .iter()
        .map(|name| TextParameter::from_json(row.get(name)))
        .collect();
    let references: Vec<&(dyn ToSql + Sync)> = parameters
        .iter()
        .map(|parameter| parameter as &(dyn ToSql + Sync))
        .collect();

    let rows = transaction.query(statement, &references).await?;
    Ok(rows.iter().map(|result| result.get::<_, Value>(0)).collect())
}
