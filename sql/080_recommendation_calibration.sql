-- Recall calibration of recommendation-shaped queries (recsys/search/calibration.py). A
-- recommendation's query vector (the positives' mean minus alpha times the negatives' mean) lies
-- between the items, where the HNSW graph finds neighbours less well than around an item's own
-- vector: at 1,000,000 items recall@10 was 0.99 for /similar and 0.79 for /recommendations at
-- the same ef_search. Each calibration now measures both curves; a point says which it belongs
-- to. Points of earlier calibrations are item points.
ALTER TABLE recall_calibration_points
    ADD COLUMN shape text NOT NULL DEFAULT 'item' CHECK (shape IN ('item', 'recommendation'));
ALTER TABLE recall_calibration_points DROP CONSTRAINT recall_calibration_points_pkey;
ALTER TABLE recall_calibration_points ADD PRIMARY KEY (calibration_id, shape, ef_search);
