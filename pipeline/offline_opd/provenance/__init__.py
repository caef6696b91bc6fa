"""Who made an artefact: fingerprints, provenance records, and the teacher-consistency chain."""
