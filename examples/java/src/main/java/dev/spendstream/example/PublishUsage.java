package dev.spendstream.example;

import java.io.ByteArrayOutputStream;
import java.nio.file.Path;
import java.time.Instant;
import java.time.temporal.ChronoUnit;
import java.util.ArrayList;
import java.util.List;
import java.util.Map;
import java.util.Properties;
import java.util.UUID;
import java.util.concurrent.Future;
import org.apache.avro.Schema;
import org.apache.avro.generic.GenericData;
import org.apache.avro.generic.GenericRecord;
import org.apache.avro.generic.GenericRecordBuilder;
import org.apache.avro.message.BinaryMessageEncoder;
import org.apache.kafka.clients.producer.KafkaProducer;
import org.apache.kafka.clients.producer.ProducerConfig;
import org.apache.kafka.clients.producer.ProducerRecord;
import org.apache.kafka.clients.producer.RecordMetadata;
import org.apache.kafka.common.serialization.ByteArraySerializer;
import org.apache.kafka.common.serialization.StringSerializer;

/**
 * Publishes usage events to spendstream from Java: one UsageEvent per Kafka message on usage.raw,
 * key = the project, value = Avro single-object encoding (C3 01, the 8-byte CRC-64-AVRO fingerprint
 * of the schema, the Avro binary body), which is exactly what Avro's BinaryMessageEncoder writes.
 * No schema registry: the worker knows the schema by its fingerprint. See docs/event-format.md.
 *
 * <p>Usage: {@code java -jar spendstream-java-example.jar BOOTSTRAP TOPIC PROJECT COUNT [UsageEvent.avsc]}
 *
 * <p>Prints the event_id of every event the broker acknowledged (acks=all), one per line in the
 * order sent, then a summary line on stderr. Any failed send ends the program with status 1.
 */
public final class PublishUsage {
    private PublishUsage() {}

    public static void main(String[] args) throws Exception {
        if (args.length < 4 || args.length > 5) {
            System.err.println("usage: PublishUsage BOOTSTRAP TOPIC PROJECT COUNT [path/to/dev.spendstream.UsageEvent.avsc]");
            System.exit(2);
        }
        String bootstrap = args[0];
        String topic = args[1];
        String project = args[2];
        int count = Integer.parseInt(args[3]);
        Path schemaFile = Path.of(args.length == 5 ? args[4] : "../../schemas/dev.spendstream.UsageEvent.avsc");

        // The schema file exactly as shipped in schemas/: its fingerprint is what the worker looks up.
        // Logical types only annotate it: event_id is a String (a UUID), event_time a long (micros UTC),
        // audio_seconds bytes (a decimal); GenericData.get() writes them as such, with no conversions.
        Schema schema = new Schema.Parser().parse(schemaFile.toFile());
        BinaryMessageEncoder<GenericRecord> encoder = new BinaryMessageEncoder<>(GenericData.get(), schema);

        Properties config = new Properties();
        config.put(ProducerConfig.BOOTSTRAP_SERVERS_CONFIG, bootstrap);
        config.put(ProducerConfig.ACKS_CONFIG, "all"); // acknowledged = on every in-sync replica
        config.put(ProducerConfig.ENABLE_IDEMPOTENCE_CONFIG, true); // a retried send is written once
        config.put(ProducerConfig.LINGER_MS_CONFIG, 20); // many events per request

        List<String> ids = new ArrayList<>(count);
        List<Future<RecordMetadata>> acks = new ArrayList<>(count);
        try (KafkaProducer<String, byte[]> producer =
                new KafkaProducer<>(config, new StringSerializer(), new ByteArraySerializer())) {
            for (int i = 0; i < count; i++) {
                String eventId = UUID.randomUUID().toString(); // the idempotency key: re-send the same id, counted once
                GenericRecord event = new GenericRecordBuilder(schema)
                        .set("event_id", eventId)
                        .set("event_time", ChronoUnit.MICROS.between(Instant.EPOCH, Instant.now()))
                        .set("project", project)
                        .set("service", "java-example")
                        .set("provider", "openai") // lowercase
                        .set("model", "gpt-4o") // exactly as sent to the provider
                        .set("input_tokens", 1000L + i) // uncached prompt tokens
                        .set("cached_input_tokens", i % 4 == 0 ? 512L : 0L)
                        .set("output_tokens", 200L + i) // reasoning included
                        .set("tags", Map.of("lang", "java"))
                        .build(); // every field not set takes its schema default (team, user: null; ...)
                ByteArrayOutputStream value = new ByteArrayOutputStream();
                encoder.encode(event, value);
                ids.add(eventId);
                acks.add(producer.send(new ProducerRecord<>(topic, project, value.toByteArray())));
            }
            producer.flush();
            for (int i = 0; i < count; i++) {
                acks.get(i).get(); // throws if the broker refused or the send timed out
                System.out.println(ids.get(i));
            }
        }
        System.err.printf("sent %d events for project %s to %s%n", count, project, topic);
    }
}
