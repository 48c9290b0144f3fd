-- A meter's rated maximum power, in watts: `ingestd meter import` reads and writes it.
-- IF NOT EXISTS: migration 0009 adds the same column, and either may be applied first.
ALTER TABLE meters ADD COLUMN IF NOT EXISTS max_power_w integer CHECK (max_power_w > 0);
