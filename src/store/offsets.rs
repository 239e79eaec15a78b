//! `projection_offsets`: the last Kafka offset applied per (projection, topic, partition), kept
//! in the tenant database itself and written in the same transaction as the rows it covers.
//! This is what makes at-least-once delivery apply effectively once.

use sqlx::{MySql, Transaction};

use crate::tenant::DatabaseName;

/// The stored offset, row-locked until the transaction ends.
pub async fn get(
    tx: &mut Transaction<'_, MySql>,
    db: &DatabaseName,
    projection: &str,
    topic: &str,
    partition: i32,
) -> Result<Option<i64>, sqlx::Error> {
    sqlx::query_scalar(&format!(
        "SELECT `offset` FROM {}.projection_offsets \
         WHERE projection = ? AND topic = ? AND `partition` = ? FOR UPDATE",
        db.quoted()
    ))
    .bind(projection)
    .bind(topic)
    .bind(partition)
    .fetch_optional(&mut **tx)
    .await
}

pub async fn set(
    tx: &mut Transaction<'_, MySql>,
    db: &DatabaseName,
    projection: &str,
    topic: &str,
    partition: i32,
    offset: i64,
) -> Result<(), sqlx::Error> {
    sqlx::query(&format!(
        "INSERT INTO {}.projection_offsets (projection, topic, `partition`, `offset`) \
         VALUES (?, ?, ?, ?) ON DUPLICATE KEY UPDATE `offset` = VALUES(`offset`)",
        db.quoted()
    ))
    .bind(projection)
    .bind(topic)
    .bind(partition)
    .bind(offset)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// Every (topic, partition, offset) of a projection.
pub async fn all(
    tx: &mut Transaction<'_, MySql>,
    db: &DatabaseName,
    projection: &str,
) -> Result<Vec<(String, i32, i64)>, sqlx::Error> {
    sqlx::query_as(&format!(
        "SELECT topic, `partition`, `offset` FROM {}.projection_offsets WHERE projection = ?",
        db.quoted()
    ))
    .bind(projection)
    .fetch_all(&mut **tx)
    .await
}

pub async fn clear(
    tx: &mut Transaction<'_, MySql>,
    db: &DatabaseName,
    projection: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query(&format!(
        "DELETE FROM {}.projection_offsets WHERE projection = ?",
        db.quoted()
    ))
    .bind(projection)
    .execute(&mut **tx)
    .await?;
    Ok(())
}
