//! Capture: the SQL that records each change of a watched table in the outbox,
//! and the installer that applies it for the sources of a config.
//!
//! `sql/gancho.sql` creates the schema and the shared trigger function;
//! `gancho.watch()` puts the triggers on one table. The installer runs both, so
//! `gancho install` and a DBA running `gancho install --print | psql` end in the
//! same state.

use crate::config::{Config, Source};
use crate::db::DbError;

/// The schema, tables and functions, as shipped in sql/gancho.sql.
pub const SCHEMA_SQL: &str = include_str!("../../sql/gancho.sql");

/// Removes every trigger and the schema, as shipped in sql/uninstall.sql.
pub const UNINSTALL_SQL: &str = include_str!("../../sql/uninstall.sql");

/// Builds the whole install script for a config: the schema, one
/// `gancho.watch()` call per source, and `gancho.unwatch()` for sources that an
/// earlier install watched and the config no longer lists.
pub fn install_script(config: &Config) -> String {
    let mut script = String::from(SCHEMA_SQL);
    script.push_str("\n-- Triggers for the sources of this config.\n");
    for source in &config.sources {
        script.push_str(&watch_statement(source));
        script.push('\n');
    }

    let names: Vec<String> = config.sources.iter().map(|source| sql_literal(&source.name)).collect();
    let keep = if names.is_empty() {
        "array[]::text[]".to_string()
    } else {
        format!("array[{}]", names.join(", "))
    };
    script.push_str(&format!(
        "select gancho.unwatch(source) from gancho.watched where source <> all ({keep});\n"
    ));
    script
}

fn watch_statement(source: &Source) -> String {
    format!(
        "select gancho.watch({}, {}, {}, {}, {});",
        sql_literal(&source.name),
        sql_literal(&source.qualified_table()),
        text_array(&source.key),
        text_array(&source.columns),
        source.fire_in_replica_mode,
    )
}

/// Runs the install script in one transaction, so a failure leaves the
/// database as it was.
pub async fn install(client: &mut tokio_postgres::Client, config: &Config) -> Result<(), DbError> {
    let transaction = client.transaction().await?;
    transaction.batch_execute(&install_script(config)).await?;
    transaction.commit().await?;
    Ok(())
}

/// Removes the triggers from every watched table and drops the gancho schema
/// with its history. Returns the sources whose triggers were removed.
pub async fn uninstall(client: &mut tokio_postgres::Client) -> Result<Vec<String>, DbError> {
    let transaction = client.transaction().await?;
    let installed: bool = transaction
        .query_one("select to_regclass('gancho.watched') is not null", &[])
        .await?
        .get(0);
    let sources: Vec<String> = if installed {
        transaction
            .query("select source from gancho.watched order by source", &[])
            .await?
            .iter()
            .map(|row| row.get(0))
            .collect()
    } else {
        Vec::new()
    };
    transaction.batch_execute(UNINSTALL_SQL).await?;
    transaction.commit().await?;
    Ok(sources)
}

/// Quotes a string as an SQL literal.
pub fn sql_literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

fn text_array(items: &[String]) -> String {
    if items.is_empty() {
        return "array[]::text[]".to_string();
    }
    let literals: Vec<String> = items.iter().map(|item| sql_literal(item)).collect();
    format!("array[{}]", literals.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn literals_escape_quotes() {
        assert_eq!(sql_literal("it's"), "'it''s'");
        assert_eq!(text_array(&["a".into(), "O'k".into()]), "array['a', 'O''k']");
        assert_eq!(text_array(&[]), "array[]::text[]");
    }

    #[test]
    fn watch_statement_quotes_table() {
        let source = Source {
            name: "orders".into(),
            schema: "Shop".into(),
            table: "order".into(),
            key: vec!["id".into()],
            columns: vec!["State".into()],
            truncate_event: "orders.truncated".into(),
            fire_in_replica_mode: false,
        };
        assert_eq!(
            watch_statement(&source),
            "select gancho.watch('orders', '\"Shop\".\"order\"', array['id'], array['State'], false);"
        );
    }
}
