//! A store outage before a task runs: while the claims bucket cannot be
//! read, the stage runtime holds the task (in-progress acks) instead of
//! handing it back, so the outage spends none of the task's deliveries and
//! the job succeeds once the bucket is back, on its first delivery.

use async_nats::jetstream::consumer::PullConsumer;
use std::time::Duration;
use trainyard_core::topology::{self, CLAIMS_BUCKET, TASKS_STREAM};
use trainyard_proto::v1::job_event::Kind;
use trainyard_proto::v1::{JobState, RetryPolicy, Stage};
use trainyard_tests::*;

const TIMEOUT: Duration = Duration::from_secs(90);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claims_outage_holds_the_task_without_spending_deliveries() {
    let fleet = Fleet::start().await;
    let js = async_nats::jetstream::new(fleet.nats_client().await);
    // Every service sets the topology up as it starts: take the bucket away
    // only once all three stages are consuming.
    wait_for("the stages consuming", TIMEOUT, || async {
        let mut stream = js.get_stream(TASKS_STREAM).await.ok()?;
        let info = stream.info().await.ok()?;
        (info.state.consumer_count >= 3).then_some(())
    })
    .await;
    js.delete_key_value(CLAIMS_BUCKET)
        .await
        .expect("claims bucket removed");

    let mut client = fleet.client(TOKEN).await;
    let mut spec = spec(&fleet.sample_uri().await, 10);
    // Two deliveries at most: handing the task back twice (2 s apart) would
    // fail the job long before the outage ends.
    spec.retry = Some(RetryPolicy {
        max_attempts: 2,
        ..Default::default()
    });
    let job = submit(&mut client, spec).await.job_id;

    let prepare = topology::consumer_name(Stage::Prepare, "");
    let consumer = || async {
        let stream = js.get_stream(TASKS_STREAM).await.ok()?;
        let mut consumer: PullConsumer = stream.get_consumer(&prepare).await.ok()?;
        consumer.info().await.ok().cloned()
    };
    wait_for(
        "the captioner holding the prepare task",
        TIMEOUT,
        || async {
            consumer()
                .await
                .filter(|info| info.num_ack_pending == 1)
                .map(|_| ())
        },
    )
    .await;
    // The outage itself: three hand-back delays long.
    tokio::time::sleep(Duration::from_secs(7)).await;
    let info = consumer().await.expect("consumer info");
    assert_eq!(
        info.num_redelivered, 0,
        "the task was handed back during the outage"
    );
    assert_eq!(info.num_ack_pending, 1, "the task is still held");

    let nats = fleet.config.nats.clone();
    topology::ensure(&js, &nats)
        .await
        .expect("claims bucket back");
    let events = watch_all(&mut client, &job, TIMEOUT).await;
    let record = get(&mut client, &job).await;
    assert_eq!(
        record.state(),
        JobState::Succeeded,
        "job ended {:?}: {:?}",
        record.state(),
        record.error
    );
    // `Started` (→ PREPARING) is reported on a task's first delivery only.
    assert!(
        events
            .iter()
            .any(|e| matches!(&e.kind, Some(Kind::State(s)) if s.state() == JobState::Preparing)),
        "the prepare stage started on its first delivery"
    );
    fleet.stop().await;
}
