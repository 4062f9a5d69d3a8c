-- Budgets read a period's recorded spend from the rollups (whole UTC days from the daily one):
-- for a lifetime budget that is every day since the first, filtered by the budget's scope. The
-- primary key leads with the bucket, so without these each lease operation on such a budget
-- would read every scope's rows. One index per scope kind that budgets filter by.
CREATE INDEX usage_rollup_daily_app_bucket ON usage_rollup_daily (app, bucket);
CREATE INDEX usage_rollup_daily_team_bucket ON usage_rollup_daily (team, bucket);
CREATE INDEX usage_rollup_daily_key_bucket ON usage_rollup_daily (key_id, bucket);
