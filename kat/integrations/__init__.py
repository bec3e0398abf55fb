"""KAT inside other trainers.

Each integration is a module of its own and imports its trainer's library, so importing this
package needs nothing beyond `kat`; `import kat.integrations.trl` needs TRL (`pip install 'kat[trl]'`).

- `kat.integrations.trl`: `KATDistillationTrainer`, TRL's `DistillationTrainer` with KAT's token
  selection applied to each generated batch.
"""
