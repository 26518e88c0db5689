//! The processor: turns outbox rows into events and deliveries.
//!
//! One transaction claims a batch of unprocessed outbox rows, evaluates every
//! rule of their source, runs enrichment queries, writes the events, one
//! delivery per event and matching endpoint, the rules' state, and marks the
//! rows processed. Either all of that commits or none of it does, so a crash
//! at any point loses nothing and duplicates nothing.
//!
//! A transaction-level advisory lock lets only one sidecar process the outbox
//! at a time. Rule state (a threshold's rearm) then gets the changes of a row
//! in order, because two changes of one row are serialised by the row lock and
//! take their outbox ids in commit order.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use chrono::{DateTime, Utc};
use deadpool_postgres::Transaction;
use serde_json::{Map, Value};

use super::{Change, Operation, Row, RuleMatch, StateUpdate, enrich, evaluate, needs_state};
use crate::config::{Config, Rule};
use crate::delivery::handoff::Inbox;
use crate::delivery::send::ClaimedDelivery;

/// The advisory lock key that serialises processors across sidecars. Any fixed
/// number works; this one spells "gancho" in ASCII.
const PROCESSOR_LOCK: i64 = 0x67_61_6e_63_68_6f;

/// Reads the oldest `$1` unprocessed changes. Rows of transactions that are
/// still open are invisible here and are taken by a later batch once
/// committed, so no change is skipped for having an older id.
pub const CLAIM_CHANGES_SQL: &str = "select id, source, table_name, operation, key, old, new, changed_at
     from gancho.outbox where processed_at is null order by id limit $1";

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct BatchOutcome {
    /// Outbox rows consumed.
    pub changes: usize,
    pub events: usize,
    pub deliveries: usize,
    /// Deliveries created claimed and handed to their dispatchers.
    pub handed: usize,
    /// Whether another sidecar held the processor lock.
    pub busy: bool,
    /// Whether the batch was full, so more rows may be waiting.
    pub full: bool,
}

/// An event ready to insert, with the endpoints that take it.
struct PendingEvent {
    outbox_id: i64,
    rule: String,
    event_type: String,
    data: Value,
    occurred_at: DateTime<Utc>,
    endpoints: Vec<String>,
    ordering_key: String,
}

pub struct Processor {
    config: Arc<Config>,
    /// Each endpoint's hand-off, by endpoint name.
    inboxes: HashMap<String, Arc<Inbox>>,
}

impl Processor {
    pub fn new(config: Arc<Config>, inboxes: HashMap<String, Arc<Inbox>>) -> Processor {
        Processor { config, inboxes }
    }

    /// Processes up to `batch_size` outbox rows in one transaction.
    pub async fn process_batch(
        &self,
        client: &mut deadpool_postgres::Client,
    ) -> Result<BatchOutcome, tokio_postgres::Error> {
        // Most looks at an idle outbox find nothing, and one index probe
        // finds that out without a transaction and a lock.
        let probe = client
            .prepare_cached("select 1 from gancho.outbox where processed_at is null limit 1")
            .await?;
        let waiting = client.query_opt(&probe, &[]).await?;
        if waiting.is_none() {
            return Ok(BatchOutcome::default());
        }

        let transaction = client.transaction().await?;
        let lock = transaction
            .prepare_cached("select pg_try_advisory_xact_lock($1)")
            .await?;
        let locked: bool = transaction.query_one(&lock, &[&PROCESSOR_LOCK]).await?.get(0);
        if !locked {
            return Ok(BatchOutcome {
                busy: true,
                ..BatchOutcome::default()
            });
        }
        let timeout_ms = self.config.sidecar.enrich_timeout.as_millis();
        // The pool's sessions commit asynchronously, but this commit waits
        // for the WAL flush: once a delivery can be claimed and sent, its
        // webhook id must survive a server crash. One flush per batch of
        // changes costs little.
        transaction
            .batch_execute(&format!(
                "set local statement_timeout = {timeout_ms}; set local synchronous_commit = on"
            ))
            .await?;

        // Claim the oldest unprocessed rows. Rows of transactions that are still
        // open are invisible here and are taken by a later batch once committed.
        let claim = transaction.prepare_cached(CLAIM_CHANGES_SQL).await?;
        let rows = transaction.query(&claim, &[&self.config.sidecar.batch_size]).await?;
        if rows.is_empty() {
            return Ok(BatchOutcome::default());
        }
        let ids: Vec<i64> = rows.iter().map(|row| row.get(0)).collect();
        let changes: Vec<Change> = rows
            .iter()
            .filter_map(parse_change)
            .filter_map(|change| self.project(change))
            .collect();

        // Evaluate every rule in outbox order, carrying rule state between changes of one row.
        let mut states = load_states(&transaction, &self.config.rules, &changes).await?;
        let mut dirty_states: BTreeSet<(String, String)> = BTreeSet::new();
        let mut events = Vec::new();
        let mut statements = StatementCache::new();
        for change in &changes {
            if change.operation == Operation::Truncate {
                if let Some(event) = self.truncate_event(change) {
                    tracing::warn!(change_id = change.id, table = %change.table, event_type = %event.event_type, "watched table truncated");
                    events.push(event);
                }
                continue;
            }
            for rule in self.config.rules.iter().filter(|rule| rule.source == change.source) {
                let state_key = (rule.name.clone(), change.key.to_string());
                let state = states.get(&state_key).and_then(|state| state.as_deref());
                let (found, update) = evaluate(rule, change, state);

                match update {
                    StateUpdate::Keep => {}
                    StateUpdate::Set(value) => {
                        states.insert(state_key.clone(), Some(value.to_string()));
                        dirty_states.insert(state_key);
                    }
                    StateUpdate::Clear => {
                        states.insert(state_key.clone(), None);
                        dirty_states.insert(state_key);
                    }
                }
                if let Some(found) = found {
                    events.push(
                        self.build_event(&transaction, &mut statements, rule, change, found)
                            .await?,
                    );
                }
            }
        }

        // Record the results, then mark the batch consumed, all in this transaction.
        let mut outcome = BatchOutcome {
            changes: ids.len(),
            full: ids.len() as i64 >= self.config.sidecar.batch_size,
            events: events.len(),
            ..BatchOutcome::default()
        };
        let mut per_endpoint: HashMap<&str, usize> = HashMap::new();
        for event in &events {
            outcome.deliveries += event.endpoints.len();
            for endpoint in &event.endpoints {
                *per_endpoint.entry(endpoint.as_str()).or_default() += 1;
            }
        }
        let rooms = self.reserve_rooms(&per_endpoint);
        let created = insert_events(
            &transaction,
            &events,
            &rooms,
            self.config.sidecar.lease.as_millis() as f64,
        )
        .await?;
        save_states(&transaction, &states, &dirty_states).await?;
        let statement = transaction
            .prepare_cached("update gancho.outbox set processed_at = now() where id = any($1)")
            .await?;
        transaction.execute(&statement, &[&ids]).await?;
        transaction.commit().await?;

        // Only now may the deliveries be sent: before the commit they could
        // still be rolled back.
        for (endpoint, handed) in created.handed {
            if let Some(inbox) = self.inboxes.get(&endpoint) {
                outcome.handed += handed.len();
                inbox.hand(handed);
            }
        }
        for endpoint in &created.unclaimed {
            if let Some(inbox) = self.inboxes.get(endpoint) {
                inbox.request_claim();
            }
        }
        for event in &events {
            tracing::debug!(change_id = event.outbox_id, rule = %event.rule, event_type = %event.event_type, endpoints = event.endpoints.len(), "event recorded");
        }
        Ok(outcome)
    }

    /// Reserves room at each endpoint's dispatcher for this batch's new
    /// deliveries, as (endpoint, room, ordered) for the insert.
    fn reserve_rooms(&self, per_endpoint: &HashMap<&str, usize>) -> Vec<(String, i32, bool)> {
        let mut rooms = Vec::new();
        for endpoint in &self.config.endpoints {
            let Some(&requested) = per_endpoint.get(endpoint.name.as_str()) else {
                continue;
            };
            let Some(inbox) = self.inboxes.get(&endpoint.name) else {
                continue;
            };
            let room = inbox.reserve(requested);
            if room > 0 {
                rooms.push((endpoint.name.clone(), room as i32, endpoint.ordered));
            }
        }
        rooms
    }

    /// Builds the event of a TRUNCATE. It removes rows without a row trigger
    /// firing, so rules cannot evaluate it, and it becomes the source's own event type.
    fn truncate_event(&self, change: &Change) -> Option<PendingEvent> {
        let source = self.config.source(&change.source)?;
        let data = change_data(Value::Null, change);

        Some(PendingEvent {
            outbox_id: change.id,
            // Rule names are validated to [a-z0-9_-], so this one cannot be a rule's.
            rule: ":truncate".to_string(),
            endpoints: self.endpoints_for(&source.truncate_event),
            event_type: source.truncate_event.clone(),
            data: Value::Object(data),
            occurred_at: change.changed_at,
            ordering_key: format!("{}:truncate", change.source),
        })
    }

    /// Keeps exactly the source's configured key and columns in a change. The
    /// trigger records every column except those `gancho.watch()` listed at
    /// install time, so a column added since then shows up until the next
    /// install, and a dropped or renamed one is missing. Here the first is
    /// removed and the second becomes null, so payloads and rule state keep
    /// their shape either way. Returns None for an update that changed only
    /// columns outside the config, which the trigger records until the next
    /// install.
    fn project(&self, mut change: Change) -> Option<Change> {
        let Some(source) = self.config.source(&change.source) else {
            return Some(change);
        };
        if change.operation == Operation::Truncate {
            return Some(change);
        }

        // Keeps the order the row came in (jsonb's), because rule state and
        // ordering keys compare the key's text.
        let pick = |row: &Row, columns: &[String]| -> Row {
            let mut picked: Row = row
                .iter()
                .filter(|(column, _)| columns.contains(column))
                .map(|(column, value)| (column.clone(), value.clone()))
                .collect();
            for column in columns {
                if !picked.contains_key(column) {
                    picked.insert(column.clone(), Value::Null);
                }
            }
            picked
        };
        if let Value::Object(key) = &change.key {
            change.key = Value::Object(pick(key, &source.key));
        }
        let old = change.old.as_ref().map(|row| pick(row, &source.columns));
        let new = change.new.as_ref().map(|row| pick(row, &source.columns));

        // Equal values before projection mean the key changed, which counts.
        let only_other_columns = change.operation == Operation::Update && old == new && change.old != change.new;
        if only_other_columns {
            return None;
        }
        change.old = old;
        change.new = new;
        Some(change)
    }

    fn endpoints_for(&self, event_type: &str) -> Vec<String> {
        self.config
            .endpoints
            .iter()
            .filter(|endpoint| endpoint.accepts(event_type))
            .map(|endpoint| endpoint.name.clone())
            .collect()
    }

    async fn build_event(
        &self,
        transaction: &Transaction<'_>,
        statements: &mut StatementCache,
        rule: &Rule,
        change: &Change,
        found: RuleMatch,
    ) -> Result<PendingEvent, tokio_postgres::Error> {
        let mut data = change_data(Value::String(rule.name.clone()), change);
        data.extend(found.details);

        let errors = self.enrich(transaction, statements, rule, change, &mut data).await?;
        if !errors.is_empty() {
            data.insert("errors".into(), Value::Object(errors));
        }

        let endpoints = self.endpoints_for(&found.event_type);
        Ok(PendingEvent {
            outbox_id: change.id,
            rule: rule.name.clone(),
            event_type: found.event_type,
            data: Value::Object(data),
            occurred_at: change.changed_at,
            endpoints,
            ordering_key: format!("{}:{}", change.source, change.key),
        })
    }

    /// Runs the rule's enrichment queries, each behind a savepoint, so a failing
    /// query costs only its own result. Its error goes into `data.errors`
    /// instead of holding back the event. A lost connection is returned as an
    /// error, so the whole batch is retried.
    async fn enrich(
        &self,
        transaction: &Transaction<'_>,
        statements: &mut StatementCache,
        rule: &Rule,
        change: &Change,
        data: &mut Map<String, Value>,
    ) -> Result<Map<String, Value>, tokio_postgres::Error> {
        let mut errors = Map::new();
        if rule.enrich.is_empty() {
            return Ok(errors);
        }
        let mut row: Row = change.key.as_object().cloned().unwrap_or_default();
        if let Some(current) = change.current_row() {
            row.extend(current.clone());
        }

        for (index, enrichment) in rule.enrich.iter().enumerate() {
            transaction.batch_execute("savepoint gancho_enrich").await?;
            let result = match statements.get(&(rule.name.clone(), index)) {
                Some(statement) => enrich::run(transaction, statement, enrichment, &row).await,
                None => match transaction.prepare(&enrich::wrapped_sql(enrichment)).await {
                    Ok(statement) => {
                        let result = enrich::run(transaction, &statement, enrichment, &row).await;
                        statements.insert((rule.name.clone(), index), statement);
                        result
                    }
                    Err(error) => Err(error),
                },
            };
            match result {
                Ok(rows) => {
                    transaction.batch_execute("release savepoint gancho_enrich").await?;
                    data.insert(enrichment.name.clone(), Value::Array(rows));
                }
                Err(error) if error.code().is_none() || error.is_closed() => return Err(error),
                Err(error) => {
                    transaction.batch_execute("rollback to savepoint gancho_enrich").await?;
                    let message = error
                        .as_db_error()
                        .map(|db| db.message().to_string())
                        .unwrap_or_else(|| error.to_string());
                    tracing::warn!(rule = %rule.name, enrichment = %enrichment.name, change_id = change.id, error = %message, "enrichment query failed; the event is sent without its result");
                    data.insert(enrichment.name.clone(), Value::Null);
                    errors.insert(enrichment.name.clone(), Value::String(message));
                }
            }
        }
        Ok(errors)
    }
}

/// Builds the fields of `data` that every event of a change carries.
fn change_data(rule: Value, change: &Change) -> Map<String, Value> {
    let row_or_null = |row: &Option<Row>| row.clone().map(Value::Object).unwrap_or(Value::Null);

    let mut data = Map::new();
    data.insert("rule".into(), rule);
    data.insert("source".into(), Value::String(change.source.clone()));
    data.insert("table".into(), Value::String(change.table.clone()));
    data.insert("operation".into(), Value::String(change.operation.as_str().into()));
    data.insert("key".into(), change.key.clone());
    data.insert("old".into(), row_or_null(&change.old));
    data.insert("new".into(), row_or_null(&change.new));
    data.insert("changed_at".into(), Value::String(change.changed_at.to_rfc3339()));
    data.insert("change_id".into(), Value::from(change.id));
    data
}

fn parse_change(row: &tokio_postgres::Row) -> Option<Change> {
    let id: i64 = row.get(0);
    let operation_text: String = row.get(3);
    let Some(operation) = Operation::parse(&operation_text) else {
        tracing::warn!(change_id = id, operation = %operation_text, "outbox row with an unknown operation skipped");
        return None;
    };
    let as_row = |value: Option<Value>| match value {
        Some(Value::Object(map)) => Some(map),
        _ => None,
    };
    Some(Change {
        id,
        source: row.get(1),
        table: row.get(2),
        operation,
        key: row.get::<_, Option<Value>>(4).unwrap_or(Value::Null),
        old: as_row(row.get(5)),
        new: as_row(row.get(6)),
        changed_at: row.get(7),
    })
}

type StateMap = HashMap<(String, String), Option<String>>;

/// Enrichment queries prepared once per batch, by rule name and position.
type StatementCache = HashMap<(String, usize), tokio_postgres::Statement>;

async fn load_states(
    transaction: &Transaction<'_>,
    rules: &[Rule],
    changes: &[Change],
) -> Result<StateMap, tokio_postgres::Error> {
    let stateful: Vec<&Rule> = rules.iter().filter(|rule| needs_state(rule)).collect();
    let mut states = StateMap::new();
    if stateful.is_empty() {
        return Ok(states);
    }

    let rule_names: Vec<String> = stateful.iter().map(|rule| rule.name.clone()).collect();
    let keys: Vec<Value> = changes
        .iter()
        .filter(|change| stateful.iter().any(|rule| rule.source == change.source))
        .map(|change| change.key.clone())
        .collect();
    if keys.is_empty() {
        return Ok(states);
    }

    let statement = transaction
        .prepare_cached("select rule, key, state from gancho.rule_state where rule = any($1) and key = any($2)")
        .await?;

    let rows = transaction.query(&statement, &[&rule_names, &keys]).await?;
    for row in rows {
        let key: Value = row.get(1);
        states.insert((row.get(0), key.to_string()), Some(row.get(2)));
    }
    Ok(states)
}

async fn save_states(
    transaction: &Transaction<'_>,
    states: &StateMap,
    dirty: &BTreeSet<(String, String)>,
) -> Result<(), tokio_postgres::Error> {
    let (mut set_rules, mut set_keys, mut set_values) = (Vec::new(), Vec::new(), Vec::new());
    let (mut clear_rules, mut clear_keys) = (Vec::new(), Vec::new());
    for state_key in dirty {
        let (rule, key_text) = state_key;
        let key: Value = serde_json::from_str(key_text).expect("state keys are serialised JSON values");
        match states.get(state_key).cloned().flatten() {
            Some(value) => {
                set_rules.push(rule.clone());
                set_keys.push(key);
                set_values.push(value);
            }
            None => {
                clear_rules.push(rule.clone());
                clear_keys.push(key);
            }
        }
    }

    if !set_rules.is_empty() {
        let statement = transaction
            .prepare_cached(
                "insert into gancho.rule_state (rule, key, state)
                 select * from unnest($1::text[], $2::jsonb[], $3::text[])
                 on conflict (rule, key) do update set state = excluded.state, updated_at = now()",
            )
            .await?;
        transaction
            .execute(&statement, &[&set_rules, &set_keys, &set_values])
            .await?;
    }
    if !clear_rules.is_empty() {
        let statement = transaction
            .prepare_cached(
                "delete from gancho.rule_state s using unnest($1::text[], $2::jsonb[]) as cleared (rule, key)
                 where s.rule = cleared.rule and s.key = cleared.key",
            )
            .await?;
        transaction.execute(&statement, &[&clear_rules, &clear_keys]).await?;
    }
    Ok(())
}

/// The deliveries written by [`insert_events`], split by how they reach their dispatcher.
#[derive(Default)]
struct Created {
    /// Deliveries created claimed, by endpoint, in id order.
    handed: HashMap<String, Vec<ClaimedDelivery>>,
    /// Endpoints with deliveries created unclaimed.
    unclaimed: BTreeSet<String>,
}

/// Writes the events and their deliveries in one statement. The join back to
/// the input is on (outbox_id, rule), which is unique because a rule emits at
/// most one event per change.
///
/// A delivery is created claimed (attempt 1, leased) when its endpoint's
/// dispatcher has room for it. At an endpoint that keeps each row's
/// deliveries in order, no earlier delivery of its row may be pending either,
/// in the table or in this batch. The rest are created unclaimed, for the
/// dispatchers' claims.
const INSERT_EVENTS_SQL: &str = "with input as (
         select * from unnest($1::bigint[], $2::text[], $3::text[], $4::jsonb[], $5::timestamptz[], $6::text[], $7::text[])
             as input (outbox_id, rule, type, data, occurred_at, endpoints, ordering_key)
     ), inserted as (
         insert into gancho.event (outbox_id, rule, type, data, occurred_at)
         select outbox_id, rule, type, data, occurred_at from input
         returning id, outbox_id, rule, type, data, occurred_at
     ), fanned as (
         select inserted.id as event_id, endpoint, input.ordering_key,
                row_number() over (partition by endpoint, input.ordering_key order by inserted.id) as nth_of_row
         from inserted
         join input on input.outbox_id = inserted.outbox_id and input.rule = inserted.rule
         cross join lateral unnest(string_to_array(input.endpoints, ',')) as endpoint
     ), eligible as (
         select fanned.*, room.room,
                room.room is not null and (not room.ordered or (nth_of_row = 1 and not exists (
                    select 1 from gancho.delivery earlier
                    where earlier.endpoint = fanned.endpoint and earlier.ordering_key = fanned.ordering_key
                      and earlier.status = 'pending'
                ))) as may_claim
         from fanned
         left join unnest($8::text[], $9::int[], $10::bool[]) as room (endpoint, room, ordered) using (endpoint)
     ), decided as (
         select eligible.*,
                may_claim and row_number() over (partition by endpoint, may_claim order by event_id) <= room as claimed
         from eligible
     ), created as (
         insert into gancho.delivery (event_id, endpoint, ordering_key, attempts, lease_until)
         select event_id, endpoint, ordering_key,
                case when claimed then 1 else 0 end,
                case when claimed then now() + $11 * interval '1 millisecond' end
         from decided
         order by event_id, endpoint
         returning id, event_id, endpoint, webhook_id, attempts
     )
     -- An event's payload travels once, with its first claimed delivery.
     select created.endpoint, created.attempts, created.id, created.webhook_id,
            inserted.id, inserted.type,
            case when created.attempts > 0
                  and row_number() over (partition by created.event_id, created.attempts order by created.id) = 1
                 then inserted.data end,
            inserted.occurred_at
     from created
     join inserted on inserted.id = created.event_id
     order by created.id";

async fn insert_events(
    transaction: &Transaction<'_>,
    events: &[PendingEvent],
    rooms: &[(String, i32, bool)],
    lease_ms: f64,
) -> Result<Created, tokio_postgres::Error> {
    let mut created = Created::default();
    if events.is_empty() {
        return Ok(created);
    }
    let outbox_ids: Vec<i64> = events.iter().map(|event| event.outbox_id).collect();
    let rules: Vec<&str> = events.iter().map(|event| event.rule.as_str()).collect();
    let types: Vec<&str> = events.iter().map(|event| event.event_type.as_str()).collect();
    let data: Vec<&Value> = events.iter().map(|event| &event.data).collect();
    let occurred: Vec<DateTime<Utc>> = events.iter().map(|event| event.occurred_at).collect();
    // Endpoint names contain no comma (config validation), so a joined list is safe.
    let endpoints: Vec<String> = events.iter().map(|event| event.endpoints.join(",")).collect();
    let ordering_keys: Vec<&str> = events.iter().map(|event| event.ordering_key.as_str()).collect();
    let room_endpoints: Vec<&str> = rooms.iter().map(|(endpoint, _, _)| endpoint.as_str()).collect();
    let room_sizes: Vec<i32> = rooms.iter().map(|(_, room, _)| *room).collect();
    let room_ordered: Vec<bool> = rooms.iter().map(|(_, _, ordered)| *ordered).collect();

    let statement = transaction.prepare_cached(INSERT_EVENTS_SQL).await?;
    let rows = transaction
        .query(
            &statement,
            &[
                &outbox_ids,
                &rules,
                &types,
                &data,
                &occurred,
                &endpoints,
                &ordering_keys,
                &room_endpoints,
                &room_sizes,
                &room_ordered,
                &lease_ms,
            ],
        )
        .await?;

    // The payload sent is the one stored, as jsonb returns it, so a first
    // attempt handed over here and a retry claimed later send the same bytes.
    // The query returns it with an event's first claimed delivery only, and
    // the others share that copy.
    let mut payloads: HashMap<i64, Arc<Value>> = HashMap::new();
    for row in rows {
        let endpoint: String = row.get(0);
        let attempt: i32 = row.get(1);
        if attempt == 0 {
            created.unclaimed.insert(endpoint);
            continue;
        }
        let event_id: i64 = row.get(4);
        let data = payloads.entry(event_id).or_insert_with(|| Arc::new(row.get(6))).clone();
        created.handed.entry(endpoint).or_default().push(ClaimedDelivery {
            id: row.get(2),
            webhook_id: row.get(3),
            attempt,
            event_id,
            event_type: row.get(5),
            data,
            occurred_at: row.get(7),
        });
    }
    Ok(created)
}
