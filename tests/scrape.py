"""Reading a process's /metrics as a test would: every sample, by name."""
import urllib.request

from prometheus_client.parser import text_string_to_metric_families


def scrape(url, timeout=10):
    """``{sample name: [(labels, value), ...]}`` of one /metrics page."""
    with urllib.request.urlopen(url, timeout=timeout) as answer:
        text = answer.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((sample.labels, sample.value))
    return samples


def total(samples, name, **labels):
    """The sum of ``name``'s samples whose labels include ``labels``."""
    return sum(value for found, value in samples.get(name, ())
               if all(found.get(key) == wanted for key, wanted in labels.items()))
