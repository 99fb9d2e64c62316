# ruby enqueue.rb N: push N TrackedJobs through Sidekiq's client (its middleware records
# each in the ledger) and print their jids as one JSON array.
require_relative "app"

count = Integer(ARGV.fetch(0))
jids = (1..count).map { |n| TrackedJob.perform_async(n) }
puts jids.to_json
