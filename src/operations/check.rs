//! `gancho check`: validates a config against the live database.

use crate::config::{Config, Limit, Problem, RuleKind, Source};
use crate::rules::enrich::wrapped_sql;

const NUMERIC_TYPES: &[&str] = &["smallint", "integer", "bigint", "numeric", "real", "double precision"];
const TIME_TYPES: &[&str] = &["date", "timestamp without time zone", "timestamp with time zone"];

/// Problems that stop gancho from working (errors) and doubtful settings (warnings).
#[derive(Debug, Default)]
pub struct CheckReport {
    pub errors: Vec<Problem>,
    pub warnings: Vec<Problem>,
}

/// Checks that every table and column exists, that column types fit their
/// rules, that enrichment queries compile with the right number of
/// parameters, and that the installed triggers match the config.
pub async fn check(client: &tokio_postgres::Client, config: &Config) -> Result<CheckReport, tokio_postgres::Error> {
    let mut report = CheckReport {
        errors: Vec::new(),
        warnings: config.warnings.clone(),
    };

    for (index, source) in config.sources.iter().enumerate() {
        let key = format!("source[{index}] \"{}\"", source.name);
        let Some(columns) = table_columns(client, source).await? else {
            report.errors.push(Problem {
                key: format!("{key}.table"),
                message: format!(
                    "table {} does not exist; check the schema and name (quote mixed-case names as '\"Name\"')",
                    source.qualified_table()
                ),
            });
            continue;
        };
        for (list, names) in [("key", &source.key), ("columns", &source.columns)] {
            for name in names {
                if !columns.iter().any(|(column, _)| column == name) {
                    report.errors.push(Problem {
                        key: format!("{key}.{list}"),
                        message: format!(
                            "column {name:?} does not exist in {}; the table has: {}",
                            source.qualified_table(),
                            columns
                                .iter()
                                .map(|(column, _)| column.as_str())
                                .collect::<Vec<_>>()
                                .join(", ")
                        ),
                    });
                }
            }
        }
        check_rule_types(config, source, &columns, &mut report);
    }

    for (index, rule) in config.rules.iter().enumerate() {
        for (enrich_index, enrichment) in rule.enrich.iter().enumerate() {
            let key = format!("rule[{index}] \"{}\".enrich[{enrich_index}]", rule.name);
            match client.prepare(&wrapped_sql(enrichment)).await {
                Ok(statement) if statement.params().len() != enrichment.params.len() => report.errors.push(Problem {
                    key: format!("{key}.params"),
                    message: format!(
                        "the query uses {} parameter(s) but params lists {}; list one column per $n",
                        statement.params().len(),
                        enrichment.params.len()
                    ),
                }),
                Ok(_) => {}
                Err(error) => report.errors.push(Problem {
                    key: format!("{key}.sql"),
                    message: format!(
                        "the query does not compile: {}",
                        error
                            .as_db_error()
                            .map(|db| db.message().to_string())
                            .unwrap_or_else(|| error.to_string())
                    ),
                }),
            }
        }
    }

    check_installation(client, config, &mut report).await?;
    Ok(report)
}

/// The table's columns and their types, or `None` when the table does not exist.
pub async fn table_columns(
    client: &tokio_postgres::Client,
    source: &Source,
) -> Result<Option<Vec<(String, String)>>, tokio_postgres::Error> {
    let exists: bool = client
        .query_one("select to_regclass($1) is not null", &[&source.qualified_table()])
        .await?
        .get(0);
    if !exists {
        return Ok(None);
    }
    let rows = client
        .query(
            "select a.attname::text, format_type(a.atttypid, null)
             from pg_attribute a
             where a.attrelid = to_regclass($1) and a.attnum > 0 and not a.attisdropped
             order by a.attnum",
            &[&source.qualified_table()],
        )
        .await?;
    Ok(Some(rows.iter().map(|row| (row.get(0), row.get(1))).collect()))
}

fn check_rule_types(config: &Config, source: &Source, columns: &[(String, String)], report: &mut CheckReport) {
    let type_of = |name: &str| {
        columns
            .iter()
            .find(|(column, _)| column == name)
            .map(|(_, kind)| kind.as_str())
    };
    let mut require = |key: String, column: &str, allowed: &[&str], what: &str| {
        if let Some(found) = type_of(column)
            && !allowed.contains(&found)
        {
            report.errors.push(Problem {
                key,
                message: format!(
                    "column {column:?} has type {found}, but this rule needs {what} ({})",
                    allowed.join(", ")
                ),
            });
        }
    };

    for (index, rule) in config
        .rules
        .iter()
        .enumerate()
        .filter(|(_, rule)| rule.source == source.name)
    {
        let key = format!("rule[{index}] \"{}\"", rule.name);
        match &rule.kind {
            RuleKind::Threshold(threshold) => {
                for column in threshold.value.columns() {
                    require(format!("{key}.value"), column, NUMERIC_TYPES, "a number");
                }
                for (name, limit) in [("limit", Some(&threshold.limit)), ("rearm", threshold.rearm.as_ref())] {
                    if let Some(Limit::Column(column)) = limit {
                        require(format!("{key}.{name}"), column, NUMERIC_TYPES, "a number");
                    }
                }
            }
            RuleKind::Shift(shift) => require(
                format!("{key}.column"),
                &shift.column,
                TIME_TYPES,
                "a date or timestamp",
            ),
            RuleKind::Transition(_) | RuleKind::Change(_) => {}
        }
    }
}

async fn check_installation(
    client: &tokio_postgres::Client,
    config: &Config,
    report: &mut CheckReport,
) -> Result<(), tokio_postgres::Error> {
    let installed: bool = client
        .query_one("select to_regclass('gancho.watched') is not null", &[])
        .await?
        .get(0);
    if !installed {
        report.warnings.push(Problem {
            key: "database_url".into(),
            message: "gancho is not installed in this database yet; run `gancho install --config FILE`".into(),
        });
        return Ok(());
    }

    let rows = client
        .query(
            "select source, key_columns, columns, fire_always from gancho.watched",
            &[],
        )
        .await?;
    for (index, source) in config.sources.iter().enumerate() {
        let found = rows.iter().find(|row| row.get::<_, String>(0) == source.name);
        let current = found.is_some_and(|row| {
            row.get::<_, Vec<String>>(1) == source.key
                && row.get::<_, Vec<String>>(2) == source.columns
                && row.get::<_, bool>(3) == source.fire_in_replica_mode
        });
        if !current {
            report.warnings.push(Problem {
                key: format!("source[{index}] \"{}\"", source.name),
                message: "the installed triggers do not match this source; run `gancho install --config FILE`".into(),
            });
        }
    }
    Ok(())
}
